"""WebRTC capacity: N concurrent browser-like calls into one service, against the same audio on the socket.

Run: python -m bench.webrtc_capacity [--calls 8] [--seconds 30]

The service runs in this process on embedded defaults (SQLite, the default model, one decode
context per core), HTTP on a free loopback port. N aiortc callers (bridge.client.webrtc, in one
separate process so their Opus encoding is not billed to the service) each play a different
generated call (bench.calls.standard_calls) as a browser microphone would: 20 ms Opus frames at
48 kHz in real time, the "events" data channel for results, `bye` 0.5 s after the audio. Calls
start 0.2 s apart. Baseline, in the same run on the same service: the same N calls as 16 kHz
PCM over the ingest WebSocket at real-time pace (20 ms frames), also from a separate process.

Figures: jobs completed (from the service's store), pooled WER against the script, final latency
(arrival of the final at the client minus the moment its sentence's speech ended, p50/p95; the
clock starts when the client's track hands its first frame to the encoder, or when the socket
client sends its first frame), and the service process's CPU: seconds of CPU per second of audio
for all N calls together (cores busy) and per call.
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


from . import corpus
from .calls import Call, standard_calls
from .drive import stream_at_pace
from .metrics import pct
from .report import emit_table
from .service import ADMIT_ALL, BENCH_KEY, running_service
from .sip_capacity import latencies, proc_cpu_s

ROOT = Path(__file__).resolve().parents[1]
STAGGER_S = 0.2
TAIL_S = 0.5


# --------------------------------------------------------------------------- the callers (child process)


async def _webrtc_call(url: str, key: str, wav: Path, i: int) -> dict:
    from bridge.client.webrtc import WebRtcClient

    await asyncio.sleep(STAGGER_S * i)
    finals: list[tuple[float, dict]] = []
    async with WebRtcClient(url, api_key=key, wav=wav) as c:
        async def bye() -> None:
            await c.wait_played()
            await asyncio.sleep(TAIL_S)
            await c.bye()

        ender = asyncio.create_task(bye())
        async with asyncio.timeout(300):
            async for ev in c:
                if ev["type"] == "final":
                    finals.append((time.monotonic(), ev))
        ender.cancel()
    return {"job_id": c.job_id, "t0": c.track.started_at, "finals": finals, "completed": c.completed is not None}


async def _socket_call(url: str, key: str, wav: Path, i: int) -> dict:
    from bridge.client.stream import StreamClient

    await asyncio.sleep(STAGGER_S * i)
    pcm, rate = corpus.read_wav(wav)
    async with StreamClient(url, api_key=key, sample_rate=rate) as s:
        t0, finals = await stream_at_pace(s, pcm.tobytes(), rate, TAIL_S, 300)
    return {"job_id": s.job_id, "t0": t0, "finals": finals, "completed": s.completed is not None}


async def _callers(kind: str, url: str, key: str, wav_dir: Path, n: int) -> dict:
    one = _webrtc_call if kind == "webrtc" else _socket_call
    cpu0, wall0 = time.process_time(), time.monotonic()
    results = await asyncio.gather(*(one(url, key, wav_dir / f"call{i}.wav", i) for i in range(n)),
                                   return_exceptions=True)
    out = [r if isinstance(r, dict) else {"error": repr(r)} for r in results]
    return {"calls": out, "cpu_s": time.process_time() - cpu0, "wall_s": time.monotonic() - wall0}


def _caller_main(args: argparse.Namespace) -> None:
    from bridge.logs import configure_logging

    configure_logging("console", "warning")
    res = asyncio.run(_callers(args.caller, args.url, args.key, Path(args.dir), args.calls))
    (Path(args.dir) / f"{args.caller}.json").write_text(json.dumps(res))


# --------------------------------------------------------------------------- media path only (this process)


async def media_only_site():
    """A bare WebRTC receiver speaking the same signaling: aiortc receive, Opus decode and the
    ingress's 48 -> 16 kHz conversion (bridge.ingress.webrtc.AudioIn), audio then dropped. What
    the WebRTC ingress costs before recognition, for comparison with the full service."""
    from aiohttp import web
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    from bridge.ice import allow_loopback_candidates
    from bridge.ingress.webrtc import AudioIn

    allow_loopback_candidates()
    pcs: set = set()

    async def offer(request: web.Request) -> web.Response:
        body = await request.json()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pcs.add(pc)
        job_id = f"media_{len(pcs)}"

        async def pump(track) -> None:
            audio = AudioIn()
            try:
                while True:
                    audio.take(await track.recv(), 1e9)
            except MediaStreamError:
                pass

        def on_channel(ch) -> None:
            ch.send(json.dumps({"type": "ready", "job_id": job_id}))

            def on_message(msg) -> None:
                if json.loads(msg).get("type") == "bye":
                    ch.send(json.dumps({"type": "completed", "job_id": job_id}))

            ch.on("message", on_message)

        pc.on("track", lambda t: asyncio.ensure_future(pump(t)) if t.kind == "audio" else None)
        pc.on("datachannel", on_channel)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.json_response({"sdp": pc.localDescription.sdp, "type": "answer", "job_id": job_id})

    app = web.Application()
    app.router.add_post("/v1/webrtc/offer", offer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()

    async def close() -> None:
        for pc in list(pcs):
            await pc.close()
        await runner.cleanup()

    return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", close  # type: ignore[union-attr]


# --------------------------------------------------------------------------- the service (this process)


async def run_phase(kind: str, svc, url: str, key: str, calls: list[Call], wav_dir: Path) -> dict:
    """Run the N callers of one kind in a child process; measure this process's CPU meanwhile.
    `svc` None: a media-only receiver, so there is no transcript to score."""
    c0, w0 = proc_cpu_s(os.getpid()), time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.webrtc_capacity", "--caller", kind, "--url", url, "--key", key,
        "--dir", str(wav_dir), "--calls", str(len(calls)), cwd=str(ROOT))
    try:
        rc = await asyncio.wait_for(proc.wait(), max(c.seconds for c in calls) + 330)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"the {kind} callers did not finish in time") from None
    cpu, wall = proc_cpu_s(os.getpid()) - c0, time.monotonic() - w0
    if rc != 0:
        raise RuntimeError(f"the {kind} callers exited with {rc}")
    res = json.loads((wav_dir / f"{kind}.json").read_text())
    lats: list[float] = []
    errs = words = completed = 0
    failures = [r["error"] for r in res["calls"] if "error" in r]
    for c, r in zip(calls, res["calls"]):
        if svc is None:
            completed += r.get("completed", False)
            continue
        if "error" in r:
            errs, words = errs + len(c.text.split()), words + len(c.text.split())
            continue
        job = await svc.store.get_job(r["job_id"])
        completed += job is not None and job.status.value == "completed" and r["completed"]
        text = " ".join(g.text for g in await svc.store.segments(r["job_id"]) if g.text)
        e, n = corpus.word_errors(c.text, text)
        errs, words = errs + e, words + n
        lats += latencies(c, [(t, ev) for t, ev in r["finals"]], r["t0"])
    audio_s = sum(c.seconds for c in calls)
    per_call_audio = audio_s / len(calls)
    return {"completed": completed, "wer": errs / max(1, words), "lat50": pct(lats, 50), "lat95": pct(lats, 95),
            "cores": cpu / per_call_audio, "per_call": cpu / audio_s, "client_cpu": res["cpu_s"] / audio_s,
            "wall": wall, "failures": failures}


async def bench(args: argparse.Namespace) -> None:
    calls = standard_calls(args.calls, args.seconds)
    with tempfile.TemporaryDirectory(prefix="cb-webrtcbench-") as tmp:
        wav_dir = Path(tmp)
        for i, c in enumerate(calls):
            corpus.write_wav(wav_dir / f"call{i}.wav", c.pcm, 16000)
        key = BENCH_KEY
        async with running_service(wav_dir / "data", **{"sip.enabled": "false", **ADMIT_ALL}) as (svc, url):
            rtc = await run_phase("webrtc", svc, url, key, calls, wav_dir)
            ws = await run_phase("socket", svc, url, key, calls, wav_dir)
            pool = svc.pool.size
        media_url, close_media = await media_only_site()
        try:
            media = await run_phase("webrtc", None, media_url, key, calls, wav_dir)
        finally:
            await close_media()
    for name, r in (("webrtc", rtc), ("socket", ws), ("media-only", media)):
        for f in r["failures"]:
            print(f"{name} call failed: {f}", file=sys.stderr)
    rows = []
    for name, r in (("WebRTC (Opus 48 kHz, aiortc callers)", rtc), ("WebSocket baseline (16 kHz PCM)", ws)):
        rows.append([name, f"{r['completed']}/{len(calls)}", f"{100 * r['wer']:.1f}", f"{r['lat50']:.2f}",
                     f"{r['lat95']:.2f}", f"{r['cores']:.2f}", f"{r['per_call']:.3f}"])
    rows.append(["WebRTC media path only (no recognizer)", f"{media['completed']}/{len(calls)} calls", "-", "-", "-",
                 f"{media['cores']:.2f}", f"{media['per_call']:.3f}"])
    emit_table(
        "webrtc_capacity",
        f"WebRTC capacity: {len(calls)} concurrent calls of {args.seconds:.0f} s, {os.cpu_count()} cores, "
        f"model tiny.en, decode pool {pool}",
        ["ingress", "jobs completed", "WER %", "final lat p50 s", "p95 s",
         "service CPU s/audio s (all calls)", "per call"],
        rows,
        notes=[f"ratio WebRTC / socket: final latency p50 x{rtc['lat50'] / ws['lat50']:.2f}, "
               f"p95 x{rtc['lat95'] / ws['lat95']:.2f}, service CPU x{rtc['per_call'] / max(1e-9, ws['per_call']):.2f} "
               f"({rtc['per_call'] - ws['per_call']:+.3f} CPU s per audio s per call)",
               "Service CPU: the service process only (callers run in another process). 'all calls' is CPU "
               "seconds per second of one call's audio, i.e. cores busy while the N calls run; 'per call' divides "
               "by N. When the cores are saturated, the recognizer decodes fewer partials, so the two full rows "
               "cost what the machine has; the media-only row is what WebRTC itself adds per call (DTLS/SRTP, "
               "jitter buffer, Opus decode, 48 -> 16 kHz resampling), measured on a bare aiortc receiver in this "
               "process with the ingress's AudioIn.",
               f"Callers' own CPU (aiortc: Opus encode, DTLS/SRTP), not counted above: "
               f"{rtc['client_cpu']:.3f} CPU s per audio s per call (socket callers {ws['client_cpu']:.3f})."],
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--caller", choices=("webrtc", "socket"), help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.caller:
        _caller_main(args)
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
