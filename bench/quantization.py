"""f16 vs q8_0 vs q5_0 for tiny.en on this CPU: what quantization buys and what it costs.

Decides `bridge.models.store.DEFAULT_FTYPE`. Measures per type: file size, load time and
resident memory (each in a fresh process, so the numbers do not mix), decode speed with 2 and 1
threads and WER on generated speech. The decodes of the three types are interleaved clip by
clip in one process, so background load on the shared machine skews all three alike.

Modes (same clips for all types, offline full-file transcription per clip, pure greedy: no
temperature fallback, whose re-decodes would make the timing depend on luck rather than weights):
  full : whisper.cpp's default 30 s encoder window (what an offline job pays per clip)
  fit  : audio_ctx sized to the clip (50 positions/s + 64), as the streaming engine decodes

Run: python -m bench.quantization [--clips N] [--no-1thread]. Writes bench/out/quantization.txt.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
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
    return out, f"{n} bench.corpus utterances, voices {', '.join(voices)}, rates 140-180 wpm"


def _norm_words(s: str) -> list[str]:
    try:
        from bench.corpus import normalize_text

        return normalize_text(s).split()
    except ImportError:
        return re.findall(r"[a-z0-9']+", s.lower())


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(edit distance in words, reference words): summed over clips for a corpus-level WER."""
    r, h = _norm_words(ref), _norm_words(hyp)
    prev = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        cur = [i] + [0] * len(h)
        for j, hw in enumerate(h, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
        prev = cur
    return prev[-1], len(r)


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
        temperature_inc=0.0,  # pure greedy: a temperature fallback would time the fallback lottery
    )


def worker_load(path: str) -> dict:
    """Fresh process: RSS added by one loaded model (+ one decode's buffers), and load times."""
    import pywhispercpp.model  # noqa: F401  (import cost is not model cost)

    base = _proc_status("VmRSS")
    t0 = time.perf_counter()
    m = _load(path, 2)
    first = time.perf_counter() - t0
    rss_loaded = _proc_status("VmRSS") - base
    m.transcribe(np.zeros(SAMPLE_RATE * 2, dtype=np.float32))
    peak = _proc_status("VmHWM") - base
    del m
    gc.collect()
    times = [first]
    for _ in range(2):
        t0 = time.perf_counter()
        m = _load(path, 2)
        times.append(time.perf_counter() - t0)
        del m
        gc.collect()
    return {"load_s": sorted(times)[1], "rss_loaded": rss_loaded, "rss_peak": peak}


def _text(segments) -> str:
    return " ".join(s.text.strip() for s in segments).strip()


def worker_decode(paths: dict[str, str], audio_file: str, threads: list[int], fit: bool) -> dict:
    """All types loaded at once; decodes interleaved per clip so load drift hits all alike."""
    data = np.load(audio_file, allow_pickle=False)
    audios = [data[f"a{i}"] for i in range(int(data["n"]))]
    models = {ft: _load(p, threads[0]) for ft, p in paths.items()}
    warm = np.zeros(SAMPLE_RATE, dtype=np.float32)
    res: dict = {}
    modes = [("full", 2)] + [("full", t) for t in threads if t != 2] + ([("fit", 2)] if fit else [])
    for mode, t in modes:
        key = f"{mode}{t}"
        for m in models.values():
            m.transcribe(warm, n_threads=t, audio_ctx=0)
        res[key] = {ft: {"time": [], "text": []} for ft in models}
        for audio in audios:
            ctx = min(1500, int(len(audio) / SAMPLE_RATE * 50) + 64) if mode == "fit" else 0
            for ft, m in models.items():
                t0 = time.perf_counter()
                segs = m.transcribe(audio, n_threads=t, audio_ctx=ctx)
                res[key][ft]["time"].append(time.perf_counter() - t0)
                res[key][ft]["text"].append(_text(segs))
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
    proc = subprocess.run(
        [sys.executable, "-m", "bench.quantization", *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quantization", description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=24, help="number of utterances (default 24)")
    ap.add_argument("--no-1thread", action="store_true", help="skip the 1-thread decode pass")
    ap.add_argument("--no-fit", action="store_true", help="skip the fitted audio_ctx pass")
    ap.add_argument("--cache-dir", help="model cache for the converted files (default: the normal one)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:  # internal: child processes print one JSON line
        kind, *rest = a.worker
        if kind == "load":
            out = worker_load(rest[0])
        else:
            spec = json.loads(rest[0])
            out = worker_decode(spec["paths"], spec["audio"], spec["threads"], spec["fit"])
        print(json.dumps(out))
        return 0

    from bridge.models import store

    t_start = time.monotonic()
    load0 = os.getloadavg()[0]
    paths = {ft: str(store.install("tiny.en", ft, a.cache_dir)) for ft in FTYPES}
    data, source = clips(a.clips)
    audio_s = [len(x) / SAMPLE_RATE for _, x in data]
    print(f"{len(data)} clips, {sum(audio_s):.1f} s of audio ({source})", file=sys.stderr)

    rows = []
    for ft in FTYPES:
        r = _run_worker(["--worker", "load", paths[ft]])
        rows.append(Row(ft, os.path.getsize(paths[ft]), r["load_s"], r["rss_loaded"], r["rss_peak"]))
        print(f"loaded {ft}: {r}", file=sys.stderr)

    threads = [2] if a.no_1thread else [2, 1]
    with tempfile.TemporaryDirectory() as tmp:
        audio_file = os.path.join(tmp, "clips.npz")
        np.savez(audio_file, n=len(data), **{f"a{i}": x for i, (_, x) in enumerate(data)})
        spec = {"paths": paths, "audio": audio_file, "threads": threads, "fit": not a.no_fit}
        dec = _run_worker(["--worker", "decode", json.dumps(spec)])

    refs = [t for t, _ in data]
    total_audio = sum(audio_s)

    def wer(key: str, ft: str) -> tuple[float, int, int]:
        errs = [word_errors(r, h) for r, h in zip(refs, dec[key][ft]["text"])]
        e, n = sum(x[0] for x in errs), sum(x[1] for x in errs)
        return 100.0 * e / n, e, n

    def speed(key: str, ft: str) -> float:
        return total_audio / sum(dec[key][ft]["time"])

    mb = 1 << 20
    lines = [
        f"tiny.en quantization, {len(data)} clips / {total_audio:.0f} s of generated speech ({source})",
        f"CPU: {os.cpu_count()} cores; load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end",
        "speed = audio seconds / decode seconds (higher is faster); WER over all clips, greedy without fallback, en",
        "full = default 30 s window per clip (offline); fit = audio_ctx 50/s + 64 (as the streaming engine)",
        "",
    ]
    head = f"{'type':<6}{'size MB':>8}{'load s':>8}{'RSS MB':>8}{'peak MB':>8}{'x RT 2t':>9}"
    if 1 in threads:
        head += f"{'x RT 1t':>9}"
    if not a.no_fit:
        head += f"{'fit 2t':>8}"
    head += f"{'WER %':>7}{'errs':>6}"
    if not a.no_fit:
        head += f"{'fit WER':>8}"
    lines += [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r.ftype:<6}{r.size / mb:>8.1f}{r.load_s:>8.3f}{r.rss_loaded / mb:>8.0f}{r.rss_peak / mb:>8.0f}"
            f"{speed('full2', r.ftype):>9.1f}"
        )
        if 1 in threads:
            line += f"{speed('full1', r.ftype):>9.1f}"
        if not a.no_fit:
            line += f"{speed('fit2', r.ftype):>8.1f}"
        w, e, n = wer("full2", r.ftype)
        line += f"{w:>7.2f}{e:>6d}"
        if not a.no_fit:
            line += f"{wer('fit2', r.ftype)[0]:>8.2f}"
        lines.append(line)
    lines += ["", "vs f16:"]
    base = rows[0]
    for r in rows[1:]:
        ft = r.ftype
        diff = sum(x != y for x, y in zip(dec["full2"][ft]["text"], dec["full2"]["f16"]["text"]))
        parts = [
            f"size x{r.size / base.size:.2f}",
            f"RSS x{r.rss_peak / base.rss_peak:.2f}",
            f"load x{r.load_s / base.load_s:.2f}",
            f"speed 2t x{speed('full2', ft) / speed('full2', 'f16'):.2f}",
        ]
        if 1 in threads:
            parts.append(f"1t x{speed('full1', ft) / speed('full1', 'f16'):.2f}")
        if not a.no_fit:
            parts.append(f"fit x{speed('fit2', ft) / speed('fit2', 'f16'):.2f}")
        parts.append(f"WER {wer('full2', ft)[0] - wer('full2', 'f16')[0]:+.2f} pp")
        parts.append(f"{diff}/{len(refs)} transcripts differ")
        lines.append(f"  {ft:<5} " + ", ".join(parts))
    examples = [
        (i, ft)
        for ft in FTYPES[1:]
        for i in range(len(refs))
        if dec["full2"][ft]["text"][i] != dec["full2"]["f16"]["text"][i]
    ][:6]
    if examples:
        lines += ["", "differing transcripts (f16 | other):"]
        for i, ft in examples:
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
