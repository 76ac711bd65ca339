"""Store load for cluster sizing: what one call writes and publishes, and what each backend sustains.

Run: python -m bench.stores [--seconds 60] [--calls 400] [--finals 30] [--concurrency 1,16] [--pg-url URL]

Two tables, one run:
1. Per-leg rates, measured on a real stream session: the real service (SQLite, tiny.en) takes a
   `--seconds` generated monologue at real-time pace (read speech with 0.9-1.6 s pauses, so a
   busy leg); every store call and every bus publish is counted by wrapping the live objects, by
   method and event type. Printed per leg-minute and per second.
2. Store throughput, SQLite vs PostgreSQL, same run: `--calls` synthetic calls, each the write
   path of a real one (reserve credits, create the job, `--finals` segments, finish, settle), run
   `--concurrency` calls at a time; calls/s, writes/s, and the latency of one segment write
   (p50/p95). PostgreSQL is `--pg-url`, or a throwaway server started with the tests' helper
   (tests/pg.py: Debian postgresql, fsync off, so commit cost is the server's, not the disk's).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

from bridge.client.stream import StreamClient
from bridge.jobs.model import Job, JobSource, new_job_id
from bridge.stores import open_stores
from tests.pg import PgServer  # the tests' throwaway server: Debian postgresql, loopback

from .calls import make_call
from .drive import stream_at_pace
from .report import emit_table
from .service import ADMIT_ALL, BENCH_KEY, running_service


def _count_calls(obj: Any, counter: Counter, prefix: str) -> None:
    """Wrap every public coroutine method of the live object `obj` to count its calls."""
    for name, fn in inspect.getmembers(obj, inspect.iscoroutinefunction):
        if name.startswith("_") or name == "close":
            continue

        def wrap(fn=fn, key=f"{prefix}.{name}"):
            async def counted(*a: Any, **kw: Any) -> Any:
                counter[key] += 1
                return await fn(*a, **kw)
            return counted

        setattr(obj, name, wrap())


async def per_leg_rates(seconds: float) -> tuple[list[list[str]], dict[str, float]]:
    call = make_call(seconds, "en-us", 160, seed=7)
    stores: Counter = Counter()
    events: Counter = Counter()
    sink = web.Application()
    sink.router.add_post("/hook", lambda request: web.Response(status=204))
    runner = web.AppRunner(sink)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]
    # one endpoint taking every event: the outbox rows and delivery records a call adds
    hooks = json.dumps([{"name": "sink", "url": hook_url, "secret": "s" * 24,
                         "events": ["call_started", "partial", "final", "usage", "dtmf", "call_ended"]}])
    with tempfile.TemporaryDirectory() as tmp:
        async with running_service(Path(tmp) / "data", **ADMIT_ALL, **{"webhooks.endpoints": hooks}) as (svc, url):
            for prefix, obj in (("jobs", svc.stores.jobs), ("keys", svc.stores.keys),
                                ("webhooks", svc.stores.webhooks)):
                _count_calls(obj, stores, prefix)
            publish = svc.bus.publish

            def counted_publish(job_id: str, event: Any, **kw: Any) -> Any:
                events[event.type.value] += 1
                return publish(job_id, event, **kw)

            svc.bus.publish = counted_publish  # type: ignore[method-assign]
            before = Counter(stores)
            async with StreamClient(url, api_key=BENCH_KEY) as s:
                await stream_at_pace(s, call.pcm.tobytes(), 16000, tail_s=1.0, timeout=seconds * 3 + 60)
            await asyncio.sleep(3.0)  # the outbox writer batches the last events; deliveries finish
    await runner.cleanup()
    audio_min = len(call.pcm) / 16000 / 60
    writes = {k: v - before.get(k, 0) for k, v in stores.items() if v - before.get(k, 0)}
    rows = []
    for k in sorted(writes):
        rows.append([f"store {k}", str(writes[k]), f"{writes[k] / audio_min:.1f}", f"{writes[k] / audio_min / 60:.3f}"])
    for k in sorted(events):
        rows.append([f"bus {k}", str(events[k]), f"{events[k] / audio_min:.1f}", f"{events[k] / audio_min / 60:.3f}"])
    total_w = sum(v for k, v in writes.items() if not k.split(".")[1].startswith(("get", "list", "count", "chain",
                                                                                   "segments", "verify", "open")))
    total_e = sum(events.values())
    rows.append(["store writes, all", str(total_w), f"{total_w / audio_min:.1f}", f"{total_w / audio_min / 60:.3f}"])
    rows.append(["bus messages, all", str(total_e), f"{total_e / audio_min:.1f}", f"{total_e / audio_min / 60:.3f}"])
    return rows, {"audio_min": audio_min, "writes_per_s": total_w / audio_min / 60, "msgs_per_s": total_e / audio_min / 60}


def _final(i: int) -> dict[str, Any]:
    t = i * 2.0
    return {"type": "final", "text": f"segment number {i} of the call", "start": t, "end": t + 1.5, "channel": i % 2,
            "speaker": ("caller", "agent")[i % 2], "speech_final": True, "language": "en", "confidence": 0.9,
            "words": [{"word": "segment", "start": t, "end": t + 0.4, "confidence": 0.9}]}


async def throughput(url: str, calls: int, finals: int, concurrency: int) -> dict[str, float]:
    stores = await open_stores(url)
    try:
        key, _ = await stores.keys.create_key("bench", credits=10**12)
        seg_lat: list[float] = []
        todo = iter(range(calls))

        async def one_call() -> None:
            job_id = new_job_id()
            await stores.keys.reserve(key.id, job_id, 39600)
            await stores.jobs.create_job(Job(id=job_id, owner=key.id, source=JobSource.STREAM,
                                             speakers=["caller", "agent"]))
            for i in range(finals):
                t = time.perf_counter()
                await stores.jobs.add_segment(job_id, _final(i))
                seg_lat.append(time.perf_counter() - t)
            await stores.jobs.finish_job(job_id, "completed", finals * 2.0)
            await stores.keys.settle(job_id, 120)

        async def worker() -> None:
            for _ in todo:
                await one_call()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        await stores.close()
    seg_lat.sort()
    writes = calls * (finals + 4)
    return {"calls_s": calls / wall, "writes_s": writes / wall, "seg_p50_ms": 1000 * statistics.median(seg_lat),
            "seg_p95_ms": 1000 * seg_lat[int(0.95 * (len(seg_lat) - 1))], "wall_s": wall}


async def main_async(args: argparse.Namespace) -> None:
    rows, rates = await per_leg_rates(args.seconds)
    emit_table("stores_rates", f"Per-leg store writes and bus messages: one {rates['audio_min'] * 60:.0f} s leg of "
               "read speech at real-time pace (tiny.en, one webhook endpoint taking every event)",
               ["what", "count", "per leg-minute", "per leg-second"], rows,
               [f"store writes {rates['writes_per_s']:.3f}/s and bus messages {rates['msgs_per_s']:.3f}/s per busy "
                "leg (reads excluded from the write total)"])

    pg = None
    pg_url = args.pg_url
    if not pg_url:
        pg = PgServer()
        pg.start()
        pg_url = pg.new_database()
    try:
        out = []
        with tempfile.TemporaryDirectory() as tmp:
            for conc in args.concurrency:
                for name, url in (("SQLite", f"sqlite:///{tmp}/bench-{conc}.db"), ("PostgreSQL", pg_url)):
                    r = await throughput(url, args.calls, args.finals, conc)
                    out.append((name, conc, r))
        base = {conc: r for name, conc, r in out if name == "SQLite"}
        table = [[name, str(conc), f"{r['calls_s']:.1f}", f"{r['writes_s']:.0f}", f"{r['seg_p50_ms']:.2f}",
                  f"{r['seg_p95_ms']:.2f}", f"{r['writes_s'] / base[conc]['writes_s']:.2f}"] for name, conc, r in out]
        emit_table("stores_throughput", f"Store throughput: {args.calls} calls x ({args.finals} segments + reserve, "
                   "create, finish, settle), one process", ["backend", "concurrent calls", "calls/s", "writes/s",
                                                            "segment write p50 ms", "p95 ms", "writes/s vs SQLite"],
                   table)
    finally:
        if pg is not None:
            pg.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--finals", type=int, default=30)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    ap.add_argument("--pg-url", default="")
    asyncio.run(main_async(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
