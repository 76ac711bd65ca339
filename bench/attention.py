"""whisper.cpp flash attention on vs off, for streaming-sized decodes: what it costs in speed and
words, and whether a clip's text depends on what the context decoded before.

Decides `WhisperEngine(flash_attn=False)`. With flash attention, whisper.cpp 1.8.5 attends over
`audio_ctx` rounded up to 256 positions with no mask; the positions past `audio_ctx` keep the
previous decode's keys and values. Each clip is decoded as a final is (audio_ctx = clip + 256
positions, the streamer's final margin) on one context per setting, interleaved clip by clip so
background load hits all alike; a third row decodes with the partials' +64 margin and a fourth
with the whole 1500-position encoder (what the margin saves against). "changed"
counts clips whose text or average log probability differs when decoded again right after a
different (12 s, full-window) decode.

Run: python -m bench.attention [--clips N]. Writes bench/out/attention.txt.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bridge.models.store import resolve
from bridge.recognizer.engines import SAMPLE_RATE, DecodeOptions
from bridge.recognizer.engines.whisper_cpp import WhisperDecodeOptions, WhisperEngine

from . import corpus
from .calls import to_mulaw_roundtrip
from .report import emit_table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--model", default="tiny.en")
    args = ap.parse_args(argv)
    model = str(resolve(args.model))
    clips = [(u.text, band, conv(u.pcm)) for u in corpus.utterances(args.clips)
             for band, conv in (("16k", lambda a: a), ("8k", to_mulaw_roundtrip))]
    other, _ = corpus.monologue(12.0, seed=7)
    full = DecodeOptions(language="en", offline=True)
    # (name, engine, encoder positions past the audio, capped at 1500); the last two rows ask
    # whether finals still need the wider margin once attention is exact, and what more would buy
    settings = [("flash attention on, +256", WhisperEngine(model, flash_attn=True), 256),
                ("flash attention off, +256", WhisperEngine(model, flash_attn=False), 256),
                ("flash attention off, +64", WhisperEngine(model, flash_attn=False), 64),
                ("flash attention off, full 1500", WhisperEngine(model, flash_attn=False), 1500)]
    res = {name: {"speed": [], "ms": [], "err": {"16k": 0, "8k": 0}, "words": {"16k": 0, "8k": 0}, "changed": 0}
           for name, _, _ in settings}
    for text, band, pcm in clips:
        for name, eng, margin in settings:
            r = res[name]
            final = WhisperDecodeOptions(language="en", ctx_margin=margin)
            t0 = time.perf_counter()
            hyp = eng.decode(pcm, final)
            dt = time.perf_counter() - t0
            r["speed"].append(len(pcm) / SAMPLE_RATE / dt)
            r["ms"].append(dt * 1000)
            e, n = corpus.word_errors(text, hyp.text)
            r["err"][band] += e
            r["words"][band] += n
            eng.decode(other, full)  # a different history, then the same clip again
            again = eng.decode(pcm, final)
            r["changed"] += (again.text, again.avg_logprob) != (hyp.text, hyp.avg_logprob)
    base = float(np.median(res[settings[0][0]]["speed"]))
    rows = []
    for name, r in res.items():
        speed = float(np.median(r["speed"]))
        rows.append([name, f"{speed:.1f}x", f"{speed / base:.2f}", f"{np.percentile(r['ms'], 50):.0f}",
                     f"{np.percentile(r['ms'], 95):.0f}",
                     f"{100 * r['err']['16k'] / r['words']['16k']:.1f} %",
                     f"{100 * r['err']['8k'] / r['words']['8k']:.1f} %",
                     f"{r['changed']}/{len(clips)}"])
    emit_table("attention", f"{args.model}, {len(clips)} decodes per setting (audio_ctx = clip + margin), 1 thread",
               ["setting", "speed (median)", "ratio", "p50 ms", "p95 ms", "WER 16 kHz", "WER 8 kHz mu-law",
                "changed by history"], rows)


if __name__ == "__main__":
    main()
