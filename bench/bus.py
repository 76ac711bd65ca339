"""What the Redis bus costs (docs/benchmarks.md, "Event bus"; docs/events.md).

1. Latency: `--events` finals published one at a time on node A (the next once the last arrived,
   so no queueing is measured), each timed from `publish` to the moment a subscriber on node B
   receives it. In-process: publisher and subscriber on one InProcessBus. Redis: two RedisBus
   "nodes" in this process on one redis-server on loopback (started here, tests/redisd.py):
   A's writer task, Redis, B's reader task. Same process, same clock; p50/p95/max.
2. Messages per call: one real stream session (the real model, `--seconds` of corpus sentences
   with `--pause` s between them, paced in real time) on the service; every envelope it publishes is counted by type
   and sized as the Redis bus encodes it. Messages/s per call = count / audio seconds.

    python -m bench.bus [--events 3000] [--seconds 60] [--pause 1.0]

The latency table notes the machine's load average: on a busy machine its figures are upper bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from bench import corpus
from bench.drive import stream_at_pace
from bench.report import emit_table
from bench.service import ADMIT_ALL, BENCH_KEY, running_service
from bridge.client.stream import StreamClient
from bridge.events.bus import EventBus, InProcessBus
from bridge.events.redisbus import STREAM, RedisBus
from bridge.events.types import Final, Word
from bridge.events.wire import encode_envelope
from bridge.logs import configure_logging
from tests.redisd import RedisServer  # the test suite's redis-server runner: one copy of it

WORDS = tuple(Word(w, i * 0.3, i * 0.3 + 0.25, 0.9) for i, w in enumerate("I would like to check my order".split()))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def latency(pub: EventBus, sub_bus: EventBus, n: int) -> list[float]:
    """Seconds from publish on `pub` to arrival at a subscriber of `sub_bus`, one event at a time."""
    sub = sub_bus.subscribe("job_bench", maxsize=n + 10)
    out = []
    for i in range(n + 50):  # the first 50 warm up connections and code paths
        t0 = time.perf_counter()
        pub.publish("job_bench", Final("I would like to check my order", WORDS, 0, "caller", i, i + 2.1, True),
                    owner="key_bench", source="stream")
        await asyncio.wait_for(sub.__anext__(), 10)
        if i >= 50:
            out.append(time.perf_counter() - t0)
    sub.close()
    return out


async def latency_phase(n: int) -> tuple[list[list[str]], str]:
    rows = []
    mem = InProcessBus()
    results = {"in-process": await latency(mem, mem, n)}
    srv = RedisServer()
    srv.start()
    a, b = RedisBus(srv.url, node_id="node_a"), RedisBus(srv.url, node_id="node_b")
    try:
        await a.start()
        await b.start()
        results["Redis (node A -> node B)"] = await latency(a, b, n)
        client = aioredis.Redis.from_url(srv.url)
        entries, used = await client.xlen(STREAM), await client.memory_usage(STREAM, samples=0)
        await client.aclose()
    finally:
        await a.close()
        await b.close()
        srv.close()
    for name, xs in results.items():
        rows.append([name, str(len(xs)), f"{_pct(xs, 0.5) * 1e3:.3f}", f"{_pct(xs, 0.95) * 1e3:.3f}",
                     f"{max(xs) * 1e3:.3f}"])
    return rows, f"Redis memory of the stream: {used / entries:.0f} bytes per entry ({entries} such finals)."


async def messages_phase(seconds: float, pause_s: float) -> tuple[list[list[str]], str]:
    pcm, _ = corpus.monologue(seconds, pause_s=pause_s)
    audio_s = len(pcm) / corpus.SAMPLE_RATE
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {**ADMIT_ALL, "model.pool_size": "1", "sip.enabled": "false"}
        async with running_service(Path(tmp) / "data", **overrides) as (svc, url):
            sub = svc.bus.subscribe(None, maxsize=1_000_000)
            async with StreamClient(url, api_key=BENCH_KEY) as s:
                await stream_at_pace(s, pcm.astype(np.int16).tobytes(), corpus.SAMPLE_RATE, 1.5, seconds * 4 + 60)
            envs = []
            while sub._q.qsize():
                env = await sub.__anext__()
                if env is not None and env.job_id == s.job_id:
                    envs.append(env)
            usage_interval = svc.config.credits.usage_interval_s
    counts = Counter(e.event.type.value for e in envs)
    sizes = {t: [len(encode_envelope(e)) for e in envs if e.event.type.value == t] for t in counts}
    rows = [[t, str(counts[t]), f"{counts[t] / audio_s:.2f}", f"{statistics.mean(sizes[t]):.0f}"]
            for t in ("call_started", "partial", "final", "usage", "dtmf", "call_ended") if counts[t]]
    total = sum(counts.values())
    all_bytes = sum(sum(v) for v in sizes.values())
    rows.append(["all", str(total), f"{total / audio_s:.2f}", f"{all_bytes / total:.0f}"])
    note = (f"One stream session, {audio_s:.1f} s of corpus sentences with {pause_s:g} s pauses paced in real "
            f"time, usage every "
            f"{usage_interval:g} s; {all_bytes / audio_s / 1024:.2f} KiB/s per call on the stream as encoded.")
    return rows, note


async def bench(args: argparse.Namespace) -> None:
    configure_logging("console", "warning")
    rows, memory = await latency_phase(args.events)
    load = "load average %.1f %.1f %.1f on %d CPUs" % (*os.getloadavg(), os.cpu_count() or 0)
    emit_table("bus_latency", f"Event bus: publish -> subscriber on another node, one final at a time "
                              f"({args.events} events)", ["bus", "events", "p50 ms", "p95 ms", "max ms"], rows,
               ["Redis: two RedisBus nodes in one process on a loopback redis-server (XADD by A's writer, "
                "XREAD by B's reader); in-process: one InProcessBus. Same clock. " + memory, f"Machine: {load}."])
    if args.seconds > 0:
        rows, note = await messages_phase(args.seconds, args.pause)
        emit_table("bus_messages", "Event bus messages per call (a real stream session)",
                   ["type", "events", "per audio second", "bytes each (encoded)"], rows, [note])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=3000, help="finals timed per bus")
    ap.add_argument("--seconds", type=float, default=60.0, help="audio of the stream session (0: skip it)")
    ap.add_argument("--pause", type=float, default=1.0, help="silence between the session's sentences (s): over "
                                                            "recognizer.endpointing_ms, each sentence is a final")
    asyncio.run(bench(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
