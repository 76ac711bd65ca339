"""Memory: the service's idle resident memory before and after a load cycle of many short sessions.

Run: python -m bench.memory [--sessions 600] [--cycles 3] [--concurrency 16] [--kinds stream,webrtc] [--speech 2]
     python -m bench.memory --context [--model tiny.en]

The service runs in this process on embedded defaults (SIP off); callers run in a separate
process so their memory is not counted. `--sessions` split over `--cycles` load cycles, each
`--concurrency` sessions at a time, alternating the `--kinds` (stream: the ingest WebSocket at 4x real time, 1 in 3 dropping
the socket without `end`; webrtc: aiortc calls at real time, ending with `bye`), each saying the
same sentence `--speech` times. Figures: resident memory (VmRSS) idle after start-up, after one
warm-up per kind (model buffers, imports, codecs), and idle after each cycle, each measured once
the idle service has given the allocator's free pages back (bridge/allocator.py); the objects
the idle service still left for Python's cycle collector at that point (a finished WebRTC call
is reference cycles; the service collects them before it trims); the live objects of the
service's per-session types at both points (they must match); what the allocator holds at the
end (glibc's mallinfo2); how many decodes were redone over the full 30 s window (each takes its
whisper context's buffers to their largest) and how many contexts the idle service reloaded to
give those back. `--context`: one whisper context's resident memory after decodes of growing length.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import corpus
from .calls import speech_bounds
from .report import emit_table
from .service import ADMIT_ALL, BENCH_KEY, running_service

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "I would like to check the status of my order, please."
# the per-session objects whose count must come back to baseline once sessions end
SESSION_TYPES = ("Call", "Leg", "StreamingRecognizer", "StreamSession", "Subscription", "WebRtcSession",
                 "RTCPeerConnection", "SileroVad", "WavRecorder", "WebSocketResponse", "AudioFrontEnd", "_Job")


def rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def live_objects(names: tuple[str, ...] = SESSION_TYPES) -> Counter[str]:
    """Objects alive now whose class name is in `names` (after a full collection)."""
    gc.collect()
    wanted = set(names)
    return Counter(n for n in (type(o).__name__ for o in gc.get_objects()) if n in wanted)


def session_pcm(repeats: int) -> np.ndarray:
    s = corpus.synthesize(SENTENCE)
    a, b = speech_bounds(s)
    gap = np.zeros(16000, np.int16)
    return np.concatenate([np.zeros(4000, np.int16)] + [np.concatenate([s[a:b], gap])] * repeats)


# --------------------------------------------------------------------------- the callers (child process)


async def _stream(url: str, pcm: np.ndarray, drop: bool) -> None:
    from bridge.client.stream import StreamClient

    data = pcm.tobytes()
    step = 16000 * 2 // 10  # 100 ms
    async with StreamClient(url, api_key=BENCH_KEY, sample_rate=16000) as s:
        for i in range(0, len(data), step):
            await s.send_audio(data[i : i + step])
            await asyncio.sleep(0.025)  # 4x real time
        if drop:
            await s.aclose()
            return
        await s.end()
        async for _ in s:
            pass


async def _webrtc(url: str, pcm: np.ndarray) -> None:
    from bridge.client.webrtc import WebRtcClient

    async with WebRtcClient(url, api_key=BENCH_KEY, audio=pcm) as c:
        async def bye() -> None:
            await c.wait_played()
            await asyncio.sleep(0.3)
            await c.bye()

        ender = asyncio.create_task(bye())
        async with asyncio.timeout(120):
            async for _ in c:
                pass
        ender.cancel()


async def _cycle(url: str, n: int, concurrency: int, kinds: list[str], repeats: int) -> dict:
    pcm = session_pcm(repeats)
    sem = asyncio.Semaphore(concurrency)
    failures: list[str] = []

    async def one(i: int) -> None:
        kind = kinds[i % len(kinds)]
        async with sem:
            try:
                if kind == "webrtc":
                    await _webrtc(url, pcm)
                else:
                    await _stream(url, pcm, drop=i % 3 == 2)
            except Exception as e:  # noqa: BLE001 - counted, the cycle goes on
                failures.append(f"{kind}: {type(e).__name__}: {e}")

    await asyncio.gather(*(one(i) for i in range(n)))
    return {"failures": failures}


def _caller_main(args: argparse.Namespace) -> None:
    from bridge.logs import configure_logging

    configure_logging("console", "warning")
    res = asyncio.run(_cycle(args.url, args.sessions, args.concurrency, args.kinds.split(","), args.speech))
    Path(args.out).write_text(json.dumps(res))


# --------------------------------------------------------------------------- the service (this process)


async def _load(url: str, n: int, concurrency: int, kinds: str, repeats: int, out: Path) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.memory", "--caller", "--url", url, "--sessions", str(n),
        "--concurrency", str(concurrency), "--kinds", kinds, "--speech", str(repeats), "--out", str(out),
        cwd=str(ROOT))
    if await proc.wait() != 0:
        raise RuntimeError("the callers failed")
    return json.loads(out.read_text())


async def _settle(svc, trims: int) -> None:
    """Until every session has ended in the service (the callers may close first) and the idle
    service has trimmed the allocator (bridge/allocator.py)."""
    while svc.calls.calls or (svc.webrtc is not None and svc.webrtc.sessions) or svc.idle_trims <= trims:
        await asyncio.sleep(0.1)


async def bench(args: argparse.Namespace) -> None:
    from bridge.allocator import stats as allocator_stats

    rows: list[list[str]] = []
    failures: list[str] = []
    per_cycle = args.sessions // args.cycles
    with tempfile.TemporaryDirectory(prefix="cb-membench-") as tmp:
        tmpd = Path(tmp)
        async with running_service(tmpd / "data", **{"sip.enabled": "false", **ADMIT_ALL}) as (svc, url):
            gc.collect()
            rows.append(["idle after start-up", "0", f"{rss_mb():.0f}", "-", "-"])
            await _load(url, 2, 2, args.kinds, args.speech, tmpd / "warm.json")
            await _settle(svc, svc.idle_trims)
            warm, left = rss_mb(), gc.collect()
            rows.append(["idle after 2 warm-up sessions", "2", f"{warm:.0f}", str(left), _objs(live_objects())])
            done, t0 = 2, time.monotonic()
            for c in range(args.cycles):
                trims = svc.idle_trims
                res = await _load(url, per_cycle, args.concurrency, args.kinds, args.speech, tmpd / "cycle.json")
                failures += res["failures"]
                await _settle(svc, trims)
                done += per_cycle
                after, left = rss_mb(), gc.collect()
                rows.append([f"idle after load cycle {c + 1}", str(done), f"{after:.0f}", str(left),
                             _objs(live_objects())])
            wall = time.monotonic() - t0
            alloc = allocator_stats()
            retried, reloads = svc.pool.retried, svc.pool.reloads
    for f in failures[:10]:
        print("session failed:", f, file=sys.stderr)
    emit_table(
        "memory_baseline" if args.baseline else "memory",
        ("Baseline, bounds switched off: " if args.baseline else "")
        + f"Memory: service RSS idle before and after {args.cycles} load cycle(s) of {per_cycle} sessions "
        f"({args.kinds}, {args.concurrency} at a time, {args.speech} sentence(s) each), {os.cpu_count()} cores, "
        "model tiny.en",
        ["point", "sessions so far", "RSS MB", "garbage left uncollected (objects)", "live per-session objects"],
        rows,
        notes=[f"growth after the warm-up: {after - warm:+.0f} MB over {done - 2} sessions; cycles took {wall:.0f} s; "
               f"{len(failures)} session(s) failed",
               f"allocator at the end (MB; in_use includes mapped blocks, not all resident): {alloc}",
               f"decodes redone over the full 30 s window (a whisper context keeps the scratch the largest "
               f"needed): {retried}; contexts reloaded when idle (bridge/recognizer/pool.py): {reloads}"],
    )


def context_scratch(model: str) -> None:
    """`--context`: what one whisper.cpp context keeps resident as its decodes grow, and after the
    idle service's reload (RecognizerPool.release_scratch). whisper.cpp allocates a context's
    buffers for the full 30 s window when it loads, and pages are resident once a decode has
    touched them: a context keeps what its largest decode (`audio_ctx`) needed."""
    from bridge import allocator
    from bridge.models.store import resolve
    from bridge.recognizer.engines import DecodeOptions
    from bridge.recognizer.pool import RecognizerPool

    allocator.configure()
    s = corpus.synthesize(SENTENCE).astype(np.float32) / 32768  # one sentence, then silence: no loop retries
    base, mapped0 = rss_mb(), allocator.stats().get("mmap_mb", 0.0)
    pool = RecognizerPool(str(resolve(model)), size=1)
    pool.start()
    eng = pool.engines[0]
    rows = [["loaded", "-", "-", f"{rss_mb() - base:.0f}"]]
    mapped = allocator.stats().get("mmap_mb", 0.0) - mapped0

    def decode(label: str, seconds: float, opts: DecodeOptions) -> None:
        a = np.concatenate([s, np.zeros(max(0, int(seconds * 16000) - len(s)), np.float32)])[: int(seconds * 16000)]
        hyp = asyncio.run(pool.decode(a, opts))
        allocator.trim()
        ctx = eng.audio_ctx_for(len(a), opts) if not hyp.retried else 0
        rows.append([label, str(ctx or 1500), "yes" if hyp.retried else "no", f"{rss_mb() - base:.0f}"])

    for secs in (2, 5, 10, 15, 20, 30):
        decode(f"after a {secs} s decode", secs, DecodeOptions())
    decode("after a 2 s decode over the full window", 2, DecodeOptions(offline=True))
    decode("after a 2 s decode again", 2, DecodeOptions())
    t0 = time.perf_counter()
    reloaded = pool.release_scratch()
    took = time.perf_counter() - t0
    del eng
    allocator.trim()
    rows.append([f"reloaded when idle ({reloaded} context, {took:.2f} s)", "-", "-", f"{rss_mb() - base:.0f}"])
    pool.close()
    emit_table("memory_context", f"Memory: one whisper.cpp context ({model}), resident MB above the process before it "
               "loaded, after decodes of growing length (each measured after malloc_trim)",
               ["point", "audio_ctx (encoder positions)", "redone over 30 s", "context RSS MB"], rows,
               notes=[f"malloc's mapped blocks the context allocated when it loaded (address space, resident "
                      f"only once touched): {mapped:.0f} MB"])


def _objs(c: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=600, help="sessions over all cycles")
    ap.add_argument("--cycles", type=int, default=3, help="load cycles, RSS measured idle after each")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--kinds", default="stream,webrtc")
    ap.add_argument("--speech", type=int, default=2, help="sentences per session")
    ap.add_argument("--baseline", action="store_true",
                    help="switch off, in this process, what bounds memory (the allocator settings, the idle "
                         "collection, context reload and trim, the socket heartbeat release, a concluding WebRTC "
                         "call's stop of its media): the figures as they were before them")
    ap.add_argument("--context", action="store_true",
                    help="instead: one whisper context's resident memory after decodes of growing length")
    ap.add_argument("--model", default="tiny.en", help="with --context: the model")
    ap.add_argument("--caller", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.caller:
        _caller_main(args)
        return
    if args.context:
        context_scratch(args.model)
        return
    if args.baseline:
        _switch_off_bounds()
    asyncio.run(bench(args))


def _switch_off_bounds() -> None:
    import bridge.allocator
    import bridge.ingress.stream
    import bridge.ingress.webrtc
    import bridge.recognizer.pool
    import bridge.service

    bridge.allocator.configure = lambda: False
    bridge.allocator.trim = lambda: False  # the service still counts its idle "trims": the bench waits on them
    bridge.ingress.stream.release_heartbeat = lambda ws: None
    bridge.service.gc = SimpleNamespace(collect=lambda: 0)  # no collection when idle
    bridge.recognizer.pool.RecognizerPool.release_scratch = lambda self: 0  # contexts keep their high-water

    async def keep_receiving(self: object) -> None:
        pass

    bridge.ingress.webrtc.WebRtcSession._stop_media = keep_receiving  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
