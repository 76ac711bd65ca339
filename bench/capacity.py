"""Capacity: how many legs one box recognizes concurrently at real-time pace, and what admission does past it.

Run: python -m bench.capacity [--legs 2,4,6,8,10] [--seconds 30] [--no-stop-after-fail] [--offer 32]

Sweep (`--legs`): for each count, that many legs play different calls at once through one
shared pool; the figure that matters is final latency p95 (target under 2 s). Resident memory
is sampled while the legs run; memory per added leg is the growth over the pool-only baseline
measured in the same run. By default the sweep stops at the first count over 2 s
(`--no-stop-after-fail` runs every count).

Admission (`--offer N`, 0 = skip; `--legs ""` skips the sweep): first `--baseline-legs` (1) offered
alone, the latency an uncontended leg gets on this box now, which admitted legs should keep; then
the real service in this
process (embedded defaults, capacity admission on), N stream sessions offered 0.2 s apart by
callers in a separate process, each playing a different call at real-time pace. Reported:
sessions admitted and refused (RATE_LIMITED), and the admitted legs' final latency p50/p95
(arrival of the final at the client minus the moment its sentence's speech ended). With
`--compare` (default) the same offer runs again with admission effectively off (no leg cap, no
latency bound), which is how every call degrades without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bridge.models.store import resolve
from bridge.recognizer.pool import RecognizerPool
from bridge.recognizer.streamer import StreamerConfig

from . import corpus
from .calls import Call, standard_calls
from .drive import play_many, stream_at_pace
from .metrics import final_latencies, partial_lags, pct
from .report import emit_table
from .service import ADMIT_ALL, BENCH_KEY, running_service
from .sip_capacity import latencies

ROOT = Path(__file__).resolve().parents[1]
STAGGER_S = 0.2
TAIL_S = 1.0


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def one_round(pool: RecognizerPool, calls, cfg: StreamerConfig) -> dict:
    peak = rss_mb()
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_mb())
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    c0, w0 = cpu_s(), time.monotonic()
    runs = await play_many(pool, [c.pcm for c in calls], pace=1.0, config=cfg)
    cpu, wall = cpu_s() - c0, time.monotonic() - w0
    stop.set()
    await sampler
    lats, lags, partials = [], [], 0
    for run, call in zip(runs, calls):
        lats += final_latencies(run, call)
        lags += partial_lags(run)
        partials += len(run.partials)
    audio_s = sum(c.seconds for c in calls)
    return {"lat50": pct(lats, 50), "lat95": pct(lats, 95), "lag50": pct(lags, 50), "lag95": pct(lags, 95),
            "peak_rss": peak, "cpu_per_audio_s": cpu / audio_s, "wall": wall,
            "partials_per_leg_min": partials / len(calls) / (audio_s / len(calls) / 60)}


def _slope(peaks: dict[int, float]) -> float:
    lo, hi = min(peaks), max(peaks)
    return (peaks[hi] - peaks[lo]) / (hi - lo) if hi > lo else float("nan")


def leg_memory_mb(pool: RecognizerPool, pcm, legs: int = 16) -> float:
    """Resident memory one more leg costs: VAD state and utterance buffers (decode memory is the pool's).

    Legs are fed without their decode task, so the shared pool's buffers do not move the figure.
    """
    import gc

    from bridge.recognizer.streamer import StreamingRecognizer

    gc.collect()
    before = rss_mb()
    recs = [StreamingRecognizer(pool, lambda ev: None, channel=i) for i in range(legs)]
    for r in recs:
        for i in range(0, len(pcm), 320):
            r.feed(pcm[i : i + 320])
    after = rss_mb()
    del recs
    return (after - before) / legs


# --------------------------------------------------------------------------- admission (real service)


async def _offer_one(url: str, wav: Path, i: int) -> dict:
    """One stream session offered at 0.2 s x i: refused (code, message, retry) or played at real time."""
    from bridge.client.stream import StreamClient, StreamError

    await asyncio.sleep(STAGGER_S * i)
    pcm, rate = corpus.read_wav(wav)
    try:
        s = await StreamClient(url, api_key=BENCH_KEY, sample_rate=rate).__aenter__()
    except StreamError as e:
        return {"refused": e.code, "message": str(e)}
    try:
        t0, finals = await stream_at_pace(s, pcm.tobytes(), rate, TAIL_S, 600)
    finally:
        await s.aclose()
    return {"job_id": s.job_id, "t0": t0, "finals": finals, "completed": s.completed is not None}


async def _offer_all(url: str, wav_dir: Path, n: int) -> list[dict]:
    res = await asyncio.gather(*(_offer_one(url, wav_dir / f"call{i}.wav", i) for i in range(n)),
                               return_exceptions=True)
    return [r if isinstance(r, dict) else {"error": repr(r)} for r in res]


def _caller_main(args: argparse.Namespace) -> None:
    from bridge.logs import configure_logging

    configure_logging("console", "warning")
    out = asyncio.run(_offer_all(args.url, Path(args.dir), args.offer))
    (Path(args.dir) / "offer.json").write_text(json.dumps(out))


async def offer_phase(calls: list[Call], wav_dir: Path, data_dir: Path, overrides: dict[str, str]) -> dict:
    """The real service with `overrides`; the N callers in a child process. Admitted/refused and latency."""
    async with running_service(data_dir, **{"sip.enabled": "false", **overrides}) as (svc, url):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.capacity", "--caller", "--url", url, "--dir", str(wav_dir),
            "--offer", str(len(calls)), cwd=str(ROOT))
        rc = await proc.wait()
        if rc != 0:
            raise RuntimeError(f"the callers exited with {rc}")
        res = json.loads((wav_dir / "offer.json").read_text())
        h = svc.admission.headroom()
        cap, pool = h.legs_capacity, svc.pool.size
        in_pool = svc.pool.final_timing(3600.0)  # every final of the run: time in the pool (queue + decode)
        how = (f"{h.cap_source}: {h.legs_per_context} per context at {h.decode_s_per_audio_s:.3f} decode s per "
               f"audio s ({h.speed_source}; calibration {svc.pool.calibrated_speed:.3f})"
               if h.decode_s_per_audio_s is not None else h.cap_source)
    lats: list[float] = []
    admitted = refused = completed = 0
    reasons: dict[str, int] = {}
    failures = [r["error"] for r in res if "error" in r]
    for c, r in zip(calls, res):
        if "refused" in r:
            refused += 1
            key = r["refused"] + (": at capacity" if "at capacity" in r["message"] else
                                  ": recognizer behind" if "behind" in r["message"] else "")
            reasons[key] = reasons.get(key, 0) + 1
        elif "job_id" in r:
            admitted += 1
            completed += r["completed"]
            lats += latencies(c, [(t, ev) for t, ev in r["finals"]], r["t0"])
    return {"admitted": admitted, "refused": refused, "completed": completed, "lat50": pct(lats, 50),
            "lat95": pct(lats, 95), "finals": len(lats), "reasons": reasons, "failures": failures, "cap": cap,
            "pool": pool, "how": how, "in_pool95": in_pool.latency_p95_s, "bound": h.max_final_latency_s}


async def admission_bench(args: argparse.Namespace) -> None:
    calls = standard_calls(args.offer, args.seconds)
    on = {k: v for k, v in (("capacity.max_legs", str(args.max_legs) if args.max_legs else ""),) if v}
    for kv in args.set:  # e.g. capacity.final_share=0.3
        key, _, value = kv.partition("=")
        on[key.strip()] = value.strip()
    runs = []
    with tempfile.TemporaryDirectory(prefix="cb-capbench-") as tmp:
        wav_dir = Path(tmp)
        for i, c in enumerate(calls):
            corpus.write_wav(wav_dir / f"call{i}.wav", c.pcm, 16000)
        if args.baseline_legs:  # what a leg gets on this box right now without contention: the latency to keep
            runs.append((f"baseline: {args.baseline_legs} offered alone (defaults)",
                         await offer_phase(calls[:args.baseline_legs], wav_dir, wav_dir / "data-base", on)))
        runs.append(("admission on (defaults" + (f", max_legs {args.max_legs}" if args.max_legs else "")
                     + "".join(f", {kv}" for kv in args.set) + ")",
                     await offer_phase(calls, wav_dir, wav_dir / "data-on", on)))
        if args.compare:
            runs.append(("admission off (no leg cap, no latency bound)",
                         await offer_phase(calls, wav_dir, wav_dir / "data-off", ADMIT_ALL)))
    rows, notes = [], []
    for name, r in runs:
        rows.append([name, str(r["admitted"] + r["refused"] + len(r["failures"])), str(r["admitted"]), str(r["refused"]), f"{r['completed']}/{r['admitted']}",
                     f"{r['lat50']:.2f}", f"{r['lat95']:.2f}", str(r["finals"])])
        in_pool = f"{r['in_pool95']:.2f}" if r["in_pool95"] is not None else "-"
        notes.append(f"{name}: leg capacity {r['cap']} ({r['how']}); finals' time in the decode pool p95 {in_pool} s "
                     f"(capacity.max_final_latency_s {r['bound']:g}); refusals by reason {r['reasons'] or 'none'}"
                     + (f"; caller failures {r['failures']}" if r["failures"] else ""))
    emit_table(
        "capacity_admission",
        f"Admission: {args.offer} stream sessions of {args.seconds:.0f} s offered {STAGGER_S:g} s apart to one "
        f"service, decode pool {runs[0][1]['pool']} context(s), model tiny.en, {os.cpu_count()} cores",
        ["run", "offered", "admitted", "refused", "completed", "admitted final lat p50 s", "p95 s", "finals scored"],
        rows, notes=notes + ["Final latency: arrival of the final at the client minus the end of its sentence's "
                             "speech (callers in a separate process). Refused sessions got `error` RATE_LIMITED "
                             "with retry_after_s and did not retry."])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--legs", default="1,2,4,6,8,10,12,14,16", help='sweep counts; "" skips the sweep')
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--pool", type=int, default=0, help="contexts (default: cores)")
    ap.add_argument("--stop-after-fail", action=argparse.BooleanOptionalAction, default=True,
                    help="end the sweep at the first count whose final p95 is over 2 s")
    ap.add_argument("--offer", type=int, default=32, help="sessions offered to the real service; 0 skips")
    ap.add_argument("--max-legs", type=int, default=0, help="capacity.max_legs for the admission run (0: default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config key for the admission-on runs (repeatable), e.g. capacity.final_share=0.3")
    ap.add_argument("--baseline-legs", type=int, default=1,
                    help="first offer this many alone: the latency admitted legs should keep (0 skips)")
    ap.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                    help="also offer them with admission off")
    ap.add_argument("--caller", action="store_true", help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.caller:
        _caller_main(args)
        return
    if args.legs:
        sweep(args)
    if args.offer:
        asyncio.run(admission_bench(args))


def sweep(args: argparse.Namespace) -> None:
    counts = [int(x) for x in args.legs.split(",")]
    model = str(resolve(args.model))
    calls = standard_calls(max(counts), args.seconds)
    pool = RecognizerPool(model, size=args.pool or None, threads=1)
    pool.start()
    base = rss_mb()
    rows, best, peaks = [], 0, {}
    try:
        for n in counts:
            r = asyncio.run(one_round(pool, calls[:n], StreamerConfig()))
            peaks[n] = r["peak_rss"]
            ok = r["lat95"] < 2.0
            best = n if ok else best
            rows.append([str(n), f"{r['lat50']:.2f}", f"{r['lat95']:.2f}", f"{r['lag50']:.2f}", f"{r['lag95']:.2f}",
                         f"{r['cpu_per_audio_s']:.3f}", f"{r['peak_rss']:.0f}",
                         f"{r['partials_per_leg_min']:.0f}", "yes" if ok else "no"])
            if not ok and args.stop_after_fail:
                break
        per_leg = leg_memory_mb(pool, calls[0].pcm[: 25 * 16000])
    finally:
        pool.close()
    emit_table(
        "capacity",
        f"Capacity: concurrent legs at real-time pace, {args.seconds:.0f} s calls, one pool of {pool.size} "
        f"context(s) x 1 thread, model {os.path.basename(model)}, {os.cpu_count()} cores. "
        f"Pool-only RSS baseline {base:.0f} MB.",
        ["legs", "final lat p50 s", "p95 s", "partial lag p50 s", "p95 s", "CPU s per audio s",
         "peak RSS MB", "partials/leg/min", "p95 < 2 s"],
        rows,
        notes=[f"largest count with final latency p95 under 2 s: {best}",
               f"resident memory per added leg: {per_leg:.1f} MB (16 legs each holding a 25 s utterance; VAD state and "
               "audio buffers; decode buffers belong to the shared pool and do not grow with legs).",
               f"peak RSS slope: {_slope(peaks):.1f} MB per leg between the smallest and largest count (includes what "
               "the benchmark itself keeps: every event of every leg, partial decode buffers, allocator arenas).",
               "Partials slow down first under load (one pending per leg, stale ones dropped); finals are never dropped."],
    )


if __name__ == "__main__":
    main()
