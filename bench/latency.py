"""Latency at real-time pace: how far partial text trails speech, how soon finals follow it.

Run: python -m bench.latency [--calls 3] [--seconds 30]
One leg at a time, audio fed in 20 ms frames at real-time pace, tiny.en on this machine.
Each configuration is measured in the same run, so their figures compare directly.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from bridge.models.store import resolve
from bridge.recognizer.pool import RecognizerPool
from bridge.recognizer.streamer import StreamerConfig

from .calls import standard_calls
from .drive import new_leg, play
from .metrics import final_latencies, partial_lags, partial_lags_true, pct
from .report import emit_table

VARIANTS = {
    "default (endpointing 700 ms)": (StreamerConfig(), (2, 1)),
    "endpointing 300 ms": (StreamerConfig(endpointing_ms=300), (2, 1)),
    "no speculative final": (StreamerConfig(speculative_ms=10_000), (2, 1)),
    "pool 1 context x 2 threads": (StreamerConfig(), (1, 2)),
}


async def measure(model: str, calls, cfg: StreamerConfig, size: int, threads: int) -> dict:
    pool = RecognizerPool(model, size=size, threads=threads)
    pool.start()
    lags, true_lags, unmatched, lats, n_partials, n_finals = [], [], 0, [], 0, 0
    try:
        for call in calls:
            run = new_leg(pool, cfg)
            await play(run, call.pcm, pace=1.0)
            lags += partial_lags(run)
            tl, um = partial_lags_true(run, call)
            true_lags += tl
            unmatched += um
            lats += final_latencies(run, call)
            n_partials += len(run.partials)
            n_finals += len(run.finals)
        st = pool.stats()
    finally:
        pool.close()
    return {
        "partial_lag_p50": pct(lags, 50), "partial_lag_p95": pct(lags, 95),
        "true_lag_p50": pct(true_lags, 50), "true_lag_p95": pct(true_lags, 95), "true_words": len(true_lags),
        "unmatched": unmatched,
        "final_latency_p50": pct(lats, 50), "final_latency_p95": pct(lats, 95),
        "partials": n_partials, "finals": n_finals, "words": len(lags),
        "decode_final_p50": st["decode_seconds"]["final"]["p50"],
        "decode_partial_p50": st["decode_seconds"]["partial"]["p50"],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--variants", default="all", help="comma-separated indexes into VARIANTS, or all")
    args = ap.parse_args(argv)
    model = str(resolve(args.model))
    calls = standard_calls(args.calls, args.seconds)
    names = list(VARIANTS)
    if args.variants != "all":
        names = [names[int(i)] for i in args.variants.split(",")]
    rows = []
    for name in names:
        cfg, (size, threads) = VARIANTS[name]
        r = asyncio.run(measure(model, calls, cfg, size, threads))
        rows.append([name, f"{r['partial_lag_p50']:.2f}", f"{r['partial_lag_p95']:.2f}",
                     f"{r['true_lag_p50']:.2f}", f"{r['true_lag_p95']:.2f}", f"{r['true_words']}/{r['words']}",
                     f"{r['final_latency_p50']:.2f}", f"{r['final_latency_p95']:.2f}",
                     f"{r['decode_partial_p50']:.3f}", f"{r['decode_final_p50']:.3f}",
                     str(r["partials"]), str(r["finals"]), str(r["words"])])
    emit_table(
        "latency",
        f"Latency at real-time pace: {len(calls)} calls x {args.seconds:.0f} s, one leg at a time, "
        f"model {os.path.basename(model)}, {os.cpu_count()} cores. Seconds.",
        ["configuration", "partial lag p50", "p95", "vs true word end p50", "p95", "words scored",
         "final latency p50", "p95",
         "partial decode p50", "final decode p50", "partials", "finals", "words"],
        rows,
        notes=["partial lag: when a word first showed (partial or final) minus its end time in the final;",
               "vs true word end: the same, minus when espeak-ng really ended the word (bench/wordtimes.py),",
               "  for final words that match the script (words scored); misheard words have no true time;",
               "final latency: final emitted minus the true end of the utterance's speech (from synthesis)."],
    )


if __name__ == "__main__":
    main()
