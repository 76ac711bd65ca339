"""f16 vs q8_0 vs q5_0 for tiny.en on this CPU: what quantization buys and what it costs.

Decides `bridge.models.store.DEFAULT_FTYPE`. Per type: file size, load time and resident memory
(each in a fresh process so the numbers do not mix), decode speed with 2 and 1 threads, and WER
on generated speech, clean and through a G.711 mu-law phone line. The three types decode the
same clips interleaved clip by clip in one process, so background load on a shared machine hits
all three alike; speed is the median over clips of audio seconds / decode seconds, which a burst
of load or one runaway decode cannot swing.

Passes (offline full-file transcription per clip, pure greedy: no temperature fallback, whose
re-decodes would time luck rather than weights):
  full : whisper.cpp's default 30 s encoder window (what an offline job pays per clip)
  fit  : audio_ctx sized to the clip (50 positions/s + 64), as the streaming engine decodes;
         "runaway" counts decodes over 3x that type's median time (the decoder looping)
  phone: full window on the clips after 8 kHz mu-law encoding and back

Run: python -m bench.quantization [--clips N]. Writes bench/out/quantization.{txt,json}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FTYPES = ("f16", "q8_0", "q5_0")
OUT_DIR = Path(__file__).resolve().parent / "out"
SAMPLE_RATE = 16000


# --------------------------------------------------------------------------- speech


def _fallback_clips(n: int) -> list[tuple[str, np.ndarray]]:
    """espeak-ng directly, for when bench/corpus.py is unavailable."""
    from bridge.models.store import load_wav

    sentences = [
        "Thank you for calling, how can I help you today?",
        "I would like to check the status of my order.",
        "Please hold while I look up your account.",
        "The technician will arrive tomorrow morning.",
        "Can I speak to a supervisor about this problem?",
        "My card was charged twice for the same purchase.",
        "Your appointment is confirmed for Tuesday afternoon.",
        "I need to cancel my subscription before the next bill.",
        "The package was supposed to arrive yesterday.",
        "Could you repeat that, the line is a little noisy?",
    ]
    voices, rates = ("en-us", "en", "en-us+f3"), (140, 160, 180)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            text = sentences[i % len(sentences)]
            wav = Path(tmp) / f"{i}.wav"
            subprocess.run(
                ["espeak-ng", "-v", voices[i % 3], "-s", str(rates[i % 3]), "-w", str(wav), text], check=True
            )
            out.append((text, load_wav(wav)))
    return out


def clips(n: int) -> tuple[list[tuple[str, np.ndarray]], str]:
    """(reference text, float32 16 kHz audio) pairs and a description of where they came from."""
    try:
        from bench import corpus
    except ImportError:
        return _fallback_clips(n), f"{n} espeak-ng sentences (fallback synthesis)"
    pad = np.zeros(int(0.2 * SAMPLE_RATE), dtype=np.float32)
    utts = corpus.utterances(n)
    out = [(u.text, np.concatenate([pad, u.pcm.astype(np.float32) / 32768.0, pad])) for u in utts]
    voices = sorted({u.voice for u in utts})
    return out, f"bench.corpus utterances; voices {', '.join(voices)}; 140-180 wpm"


def phone_line(audio: np.ndarray) -> np.ndarray:
    """16 kHz float -> 8 kHz G.711 mu-law -> back to 16 kHz float, as a SIP call delivers it."""
    import audioop  # noqa: PLC0415  (deprecated in 3.11, audioop-lts from 3.13)

    import soxr

    pcm = np.clip(audio * 32768.0, -32768, 32767).astype(np.int16)
    pcm8 = soxr.resample(pcm, SAMPLE_RATE, 8000)
    ulaw = audioop.lin2ulaw(pcm8.astype("<i2").tobytes(), 2)
    back = np.frombuffer(audioop.ulaw2lin(ulaw, 2), dtype="<i2")
    return soxr.resample(back.astype(np.float32) / 32768.0, 8000, SAMPLE_RATE).astype(np.float32)


def norm_words(s: str) -> list[str]:
    """corpus.normalize_text (number-aware: '742-918' == 'seven four two nine one eight')."""
    from bench.corpus import normalize_text

    return normalize_text(s).split()


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(edit distance in words, reference words): summed over clips for a corpus-level WER."""
    from bench.corpus import word_errors as _word_errors

    return _word_errors(ref, hyp)


# --------------------------------------------------------------------------- workers


def _proc_status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _load(path: str, threads: int):
    from pywhispercpp.model import Model

    return Model(
        path,
        redirect_whispercpp_logs_to=None,
        n_threads=threads,
        print_progress=False,
        print_realtime=False,
        language="en",
        temperature_inc=0.0,  # pure greedy (see module docstring)
    )


def worker_load(path: str) -> dict:
    """Fresh process: RSS added by one loaded model (+ one decode's buffers), and load times."""
    import pywhispercpp.model  # noqa: F401  (import cost is not model cost)

    base = _proc_status("VmRSS")
    t0 = time.perf_counter()
    m = _load(path, 2)
    times = [time.perf_counter() - t0]
    rss_loaded = _proc_status("VmRSS") - base
    m.transcribe(np.zeros(SAMPLE_RATE * 2, dtype=np.float32))
    peak = _proc_status("VmHWM") - base
    del m
    gc.collect()
    for _ in range(2):
        t0 = time.perf_counter()
        m = _load(path, 2)
        times.append(time.perf_counter() - t0)
        del m
        gc.collect()
    return {"load_s": sorted(times)[1], "rss_loaded": rss_loaded, "rss_peak": peak}


def _text(segments) -> str:
    return " ".join(s.text.strip() for s in segments).strip()


def worker_decode(paths: dict[str, str], audio_file: str, passes: list[dict]) -> dict:
    """All types loaded at once; decodes interleaved per clip so load drift hits all alike."""
    data = np.load(audio_file, allow_pickle=False)
    sets = {"clean": [data[f"a{i}"] for i in range(int(data["n"]))]}
    sets["phone"] = [data[f"p{i}"] for i in range(int(data["n"]))]
    models = {ft: _load(p, 2) for ft, p in paths.items()}
    warm = np.zeros(SAMPLE_RATE, dtype=np.float32)
    res: dict = {}
    for ps in passes:
        t, fit = ps["threads"], ps["fit"]
        for m in models.values():
            m.transcribe(warm, n_threads=t, audio_ctx=0)
        res[ps["key"]] = out = {ft: {"time": [], "text": []} for ft in models}
        t_pass = time.monotonic()
        for i, audio in enumerate(sets[ps["set"]][: ps["n"]]):
            ctx = min(1500, int(len(audio) / SAMPLE_RATE * 50) + 64) if fit else 0
            for ft, m in models.items():
                t0 = time.perf_counter()
                segs = m.transcribe(audio, n_threads=t, audio_ctx=ctx)
                out[ft]["time"].append(time.perf_counter() - t0)
                out[ft]["text"].append(_text(segs))
                if out[ft]["time"][-1] > 5:
                    print(f"  slow: {ps['key']} clip {i} {ft} {out[ft]['time'][-1]:.1f} s", file=sys.stderr, flush=True)
        print(f"pass {ps['key']}: {time.monotonic() - t_pass:.0f} s", file=sys.stderr, flush=True)
    return res


# --------------------------------------------------------------------------- driver


@dataclass
class Row:
    ftype: str
    size: int
    load_s: float
    rss_loaded: int
    rss_peak: int


def _run_worker(args: list[str]) -> dict:
    # stderr passes through: progress lines from the decode worker
    proc = subprocess.run(
        [sys.executable, "-m", "bench.quantization", *args], stdout=subprocess.PIPE, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quantization", description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=36, help="utterances (default 36: every corpus sentence once)")
    ap.add_argument("--clips-1thread", type=int, default=12, help="of those, decoded again with 1 thread")
    ap.add_argument("--cache-dir", help="model cache for the converted files (default: the normal one)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:  # internal: child processes print one JSON line
        kind, *rest = a.worker
        if kind == "load":
            out = worker_load(rest[0])
        else:
            spec = json.loads(rest[0])
            out = worker_decode(spec["paths"], spec["audio"], spec["passes"])
        print(json.dumps(out))
        return 0

    from bridge.models import store

    t_start = time.monotonic()
    load_start = os.getloadavg()[0]
    paths = {ft: str(store.install("tiny.en", ft, a.cache_dir)) for ft in FTYPES}
    data, source = clips(a.clips)
    n = len(data)
    n1 = min(a.clips_1thread, n)
    audio_s = [len(x) / SAMPLE_RATE for _, x in data]
    print(f"{n} clips, {sum(audio_s):.1f} s of audio ({source})", file=sys.stderr)

    rows = []
    for ft in FTYPES:
        r = _run_worker(["--worker", "load", paths[ft]])
        rows.append(Row(ft, os.path.getsize(paths[ft]), r["load_s"], r["rss_loaded"], r["rss_peak"]))

    passes = [
        {"key": "full2", "set": "clean", "threads": 2, "fit": False, "n": n},
        {"key": "full1", "set": "clean", "threads": 1, "fit": False, "n": n1},
        {"key": "fit2", "set": "clean", "threads": 2, "fit": True, "n": n},
        {"key": "phone2", "set": "phone", "threads": 2, "fit": False, "n": n},
    ]
    with tempfile.TemporaryDirectory() as tmp:
        audio_file = os.path.join(tmp, "clips.npz")
        arrays = {f"a{i}": x for i, (_, x) in enumerate(data)}
        arrays.update({f"p{i}": phone_line(x) for i, (_, x) in enumerate(data)})
        np.savez(audio_file, n=n, **arrays)
        dec = _run_worker(["--worker", "decode", json.dumps({"paths": paths, "audio": audio_file, "passes": passes})])

    refs = [t for t, _ in data]

    def wer(key: str, ft: str) -> tuple[float, int, int]:
        errs = [word_errors(r, h) for r, h in zip(refs, dec[key][ft]["text"])]
        e, words = sum(x[0] for x in errs), sum(x[1] for x in errs)
        return 100.0 * e / words, e, words

    def speed(key: str, ft: str) -> float:
        times = dec[key][ft]["time"]
        return float(np.median([s / t for s, t in zip(audio_s, times)]))

    def runaway(key: str, ft: str) -> int:
        times = np.array(dec[key][ft]["time"])
        return int(np.sum(times > 3 * np.median(times)))

    def differ(key: str, ft: str) -> list[int]:
        return [
            i
            for i, (x, y) in enumerate(zip(dec[key][ft]["text"], dec[key]["f16"]["text"]))
            if norm_words(x) != norm_words(y)
        ]

    mb = 1 << 20
    total_words = wer("full2", "f16")[2]
    lines = [
        f"tiny.en ggml types: {n} clips, {sum(audio_s):.0f} s, {total_words} words of espeak-ng speech ({source})",
        f"CPU: {os.cpu_count()} cores, shared; load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end",
        "x RT = median over clips of audio s / decode s (higher is faster); 1t on the first "
        f"{n1} clips; greedy, no fallback, en",
        "full = 30 s window per clip (offline); fit = audio_ctx 50/s + 64 (streaming engine);"
        " phone = 8 kHz mu-law round trip",
        "WER after bench.corpus.normalize_text (digits == spelled numbers); errs = word errors (1 error = "
        f"{100 / total_words:.2f} pp)",
        "",
    ]
    head = (
        f"{'type':<6}{'MB':>6}{'load s':>8}{'RSS MB':>8}{'peak':>6}"
        f"{'xRT 2t':>8}{'xRT 1t':>8}{'fit 2t':>8}{'runaway':>8}"
        f"{'WER %':>7}{'errs':>5}{'fit WER':>8}{'phone WER':>10}"
    )
    lines += [head, "-" * len(head)]
    for r in rows:
        ft = r.ftype
        w, e, _ = wer("full2", ft)
        lines.append(
            f"{ft:<6}{r.size / mb:>6.1f}{r.load_s:>8.3f}{r.rss_loaded / mb:>8.0f}{r.rss_peak / mb:>6.0f}"
            f"{speed('full2', ft):>8.2f}{speed('full1', ft):>8.2f}{speed('fit2', ft):>8.1f}{runaway('fit2', ft):>8d}"
            f"{w:>7.2f}{e:>5d}{wer('fit2', ft)[0]:>8.2f}{wer('phone2', ft)[0]:>10.2f}"
        )
    lines += ["", "vs f16:"]
    base = rows[0]
    for r in rows[1:]:
        ft = r.ftype

        def rel(key: str) -> str:
            return f"x{speed(key, ft) / speed(key, 'f16'):.2f}"

        lines.append(
            f"  {ft:<5} size x{r.size / base.size:.2f}, peak RSS x{r.rss_peak / base.rss_peak:.2f}, "
            f"speed full 2t {rel('full2')} / 1t {rel('full1')} / fit {rel('fit2')}, "
            f"WER {wer('full2', ft)[0] - wer('full2', 'f16')[0]:+.2f} pp "
            f"(fit {wer('fit2', ft)[0] - wer('fit2', 'f16')[0]:+.2f}, phone {wer('phone2', ft)[0] - wer('phone2', 'f16')[0]:+.2f}), "
            f"words differ from f16 on {len(differ('full2', ft))}/{n} clips ({len(differ('phone2', ft))}/{n} phone)"
        )
    examples = [(ft, i) for ft in FTYPES[1:] for i in differ("full2", ft)][:8]
    if examples:
        lines += ["", "full-window transcripts whose words differ from f16 (f16 | other):"]
        for ft, i in examples:
            lines.append(f"  [{i}] {ft}: {dec['full2']['f16']['text'][i]!r} | {dec['full2'][ft]['text'][i]!r}")
    lines.append(f"\nbench wall time {time.monotonic() - t_start:.0f} s")
    text = "\n".join(lines)
    print(text)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "quantization.txt").write_text(text + "\n", encoding="utf-8")
    (OUT_DIR / "quantization.json").write_text(
        json.dumps({"rows": [r.__dict__ for r in rows], "decode": dec, "refs": refs, "audio_s": audio_s}, indent=1),
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
