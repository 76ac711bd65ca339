"""Accuracy: streaming finals vs one offline whisper.cpp pass over the same audio and model.

Run: python -m bench.accuracy [--calls 6] [--seconds 30]
Streaming legs play at real-time pace (a few at once); the offline baseline decodes each whole
call with whisper.cpp's own 30 s windows. Calls with long pauses (one utterance per sentence)
and with short pauses (long utterances committed in pieces) are both measured, at 16 kHz and
through G.711 mu-law at 8 kHz.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from bridge.models.store import resolve
from bridge.recognizer.engines import DecodeOptions
from bridge.recognizer.engines.whisper_cpp import WhisperEngine
from bridge.recognizer.pool import RecognizerPool

from . import corpus
from .calls import standard_calls, to_mulaw_roundtrip
from .drive import play_many
from .report import emit_table

SR = 16000


def corpus_wer(pairs: list[tuple[str, str]]) -> float:
    """Word errors over all reference words (not a mean of per-call rates)."""
    counts = [corpus.word_errors(r, h) for r, h in pairs]
    return sum(e for e, _ in counts) / sum(n for _, n in counts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--sets", default="all", help="long, pieces or all")
    args = ap.parse_args(argv)
    model = str(resolve(args.model))
    sets = {
        "pauses 0.9-1.6 s": standard_calls(args.calls, args.seconds),
        "pauses 0.2-0.4 s (pieces)": standard_calls(args.calls, args.seconds, pauses=(0.2, 0.4)),
    }
    if args.sets != "all":
        sets = {k: v for k, v in sets.items() if ("pieces" in k) == (args.sets == "pieces")}
    offline = WhisperEngine(model, n_threads=os.cpu_count() or 1)
    pool = RecognizerPool(model, threads=1)
    pool.start()
    rows = []
    pooled: dict[str, tuple[list, list]] = {}  # band -> (streaming pairs, offline pairs) over all sets
    try:
        for set_name, calls in sets.items():
            for band, conv in (("16 kHz", lambda a: a), ("8 kHz mu-law", to_mulaw_roundtrip)):
                audio = [conv(c.pcm) for c in calls]
                stream_pairs, off_pairs, pieces = [], [], 0
                for i in range(0, len(calls), args.concurrent):
                    runs = asyncio.run(play_many(pool, audio[i : i + args.concurrent], pace=1.0))
                    for run, call in zip(runs, calls[i : i + args.concurrent]):
                        stream_pairs.append((call.text, run.text))
                        pieces += sum(1 for f in run.finals if not f.speech_final)
                seg_pairs = []
                final_opts = DecodeOptions()  # a final, as the streamer asks for one
                for a, call in zip(audio, calls):
                    off_pairs.append((call.text, offline.decode(a, DecodeOptions(offline=True)).text))
                    # each sentence decoded alone at its true span, as a final is: what segmenting costs
                    segs = [a[max(0, int((s0 - 0.3) * SR)) : int((s1 + 0.3) * SR)] for s0, s1 in call.spans]
                    seg_pairs.append((call.text, " ".join(offline.decode(x, final_opts).text for x in segs)))
                pooled.setdefault(band, ([], []))[0].extend(stream_pairs)
                pooled[band][1].extend(off_pairs)
                ws, wo, wseg = corpus_wer(stream_pairs), corpus_wer(off_pairs), corpus_wer(seg_pairs)
                n_words = sum(len(corpus.normalize_text(c.text).split()) for c in calls)
                rows.append([set_name, band, str(len(calls)), str(n_words), f"{100 * ws:.1f}", f"{100 * wo:.1f}",
                             f"{100 * (ws - wo):+.1f}", f"{100 * wseg:.1f}", str(pieces)])
    finally:
        pool.close()
    emit_table(
        "accuracy",
        f"Accuracy: streaming finals vs one offline pass, model {os.path.basename(model)}, "
        f"{args.calls} calls x {args.seconds:.0f} s per row (espeak-ng voices, numbers normalized to digits). WER %.",
        ["call set", "audio", "calls", "ref words", "streaming WER", "offline WER", "difference",
         "per-sentence WER", "pieces"],
        rows,
        notes=[*(f"pooled over the sets, {band}: streaming {100 * corpus_wer(st):.1f} % vs offline "
                 f"{100 * corpus_wer(off):.1f} % ({100 * (corpus_wer(st) - corpus_wer(off)):+.1f} points)"
                 for band, (st, off) in pooled.items()),
               "offline: one whisper.cpp pass over the whole call (30 s windows, whisper's own seeking);",
               "per-sentence: each sentence decoded alone at its true span, as a final is decoded (no streaming);",
               "pieces: finals with speech_final false (long utterances committed at agreed pauses)."],
    )


if __name__ == "__main__":
    main()
