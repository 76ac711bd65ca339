"""SIP capacity: N concurrent phone calls into one service, against the same audio over the socket.

Run: python -m bench.sip_capacity [--calls 16] [--seconds 30] [--workers 4]

The service runs in this process on embedded defaults (SQLite, the default model, one decode
context per core) with SIP on a free loopback port. N pjsua2 callers (`python -m sip.peer call`,
separate processes, standing in for the far end) each play a different generated call as
8 kHz G.711 (PCMU), started 0.2 s apart. Baseline, measured in the same run on the same
service: the same N calls as 8 kHz mu-law over the ingest WebSocket at real-time pace.

Figures: jobs completed, pooled WER against the script, final latency (arrival of a final
minus the moment its speech ended, p50/p95), and CPU seconds per audio second of the service
process and of the SIP worker processes (callers excluded). For SIP calls the stream clock
starts at `call_started` (the caller's player starts when media is up, within tens of ms).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path


from bridge.events.types import EventType

from . import corpus
from .calls import Call, standard_calls
from .metrics import pct
from .report import emit_table
from .service import ADMIT_ALL, BENCH_KEY, running_service

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


IDLE_S = 5.0  # seconds the workers are watched with no call


def proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except OSError:
        return 0.0


def latencies(call: Call, finals: list[tuple[float, dict]], t0: float) -> list[float]:
    """For each sentence, the first final covering its end: arrival - (t0 + spoken end)."""
    out = []
    for _, end in call.spans:
        for arrived, ev in finals:
            if ev["end"] >= end - 0.3 and ev["text"]:
                out.append(arrived - (t0 + end))
                break
    return out


async def run_sip(svc, calls: list[Call], wav_dir: Path) -> dict:
    sub = svc.bus.subscribe(None, maxsize=1_000_000)
    started: dict[str, tuple[float, str]] = {}  # job_id -> (t, user)
    finals: dict[str, list[tuple[float, dict]]] = {}
    ended: set[str] = set()

    async def listen() -> None:
        async for env in sub:
            now = time.monotonic()
            t = env.event.type
            if t is EventType.CALL_STARTED:
                uri = env.event.metadata.get("sip", {}).get("request_uri", "")
                started[env.job_id] = (now, uri.split(":", 1)[-1].split("@", 1)[0])
            elif t is EventType.FINAL:
                finals.setdefault(env.job_id, []).append((now, env.event.to_dict()))
            elif t is EventType.CALL_ENDED:
                ended.add(env.job_id)

    listener = asyncio.create_task(listen())
    worker_pids = [w.proc.pid for w in svc.sip.workers]
    # idle cost first: each worker polls pjsua2 even with no call
    i0, w_idle = sum(proc_cpu_s(p) for p in worker_pids), time.monotonic()
    await asyncio.sleep(IDLE_S)
    idle = (sum(proc_cpu_s(p) for p in worker_pids) - i0) / (time.monotonic() - w_idle) / len(worker_pids)
    c0 = proc_cpu_s(os.getpid()), sum(proc_cpu_s(p) for p in worker_pids)
    w0 = time.monotonic()
    procs = []
    for i, c in enumerate(calls):
        wav = wav_dir / f"call{i}.wav"
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sip.peer", "call", f"sip:bench{i}@127.0.0.1:{svc.sip.port}", "--play", str(wav),
            "--timeout", str(c.seconds + 60), cwd=str(ROOT),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))
        await asyncio.sleep(0.2)
    rcs = await asyncio.gather(*(p.wait() for p in procs))
    deadline = time.monotonic() + 60
    while len(ended) < len(started) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    c1 = proc_cpu_s(os.getpid()), sum(proc_cpu_s(p) for p in worker_pids)
    busy = (c1[1] - c0[1]) / (time.monotonic() - w0) / len(worker_pids)
    sub.close()
    await listener
    by_user = {user: jid for jid, (_, user) in started.items()}
    lats, errs, words = [], 0, 0
    completed = 0
    for i, c in enumerate(calls):
        jid = by_user.get(f"bench{i}")
        if jid is None:
            continue
        job = await svc.store.get_job(jid)
        completed += job.status.value == "completed"
        text = " ".join(g.text for g in await svc.store.segments(jid) if g.text)
        e, n = corpus.word_errors(c.text, text)
        errs, words = errs + e, words + n
        lats += latencies(c, finals.get(jid, []), started[jid][0])
    audio_s = sum(c.seconds for c in calls)
    return {"answered": len(started), "completed": completed, "callers_ok": sum(rc == 0 for rc in rcs),
            "wer": errs / max(1, words), "lat50": pct(lats, 50), "lat95": pct(lats, 95),
            "svc_cpu": (c1[0] - c0[0]) / audio_s, "worker_cpu": (c1[1] - c0[1]) / audio_s,
            "worker_idle_share": idle, "worker_busy_share": busy, "workers": len(worker_pids)}


async def run_socket(svc, url: str, key: str, calls: list[Call]) -> dict:
    from bridge.client.stream import StreamClient

    c0 = proc_cpu_s(os.getpid())

    async def one(i: int, c: Call) -> tuple[str, list[float], int, int]:
        await asyncio.sleep(0.2 * i)
        data = corpus.to_mulaw_8k(c.pcm)
        arrivals: list[tuple[float, dict]] = []
        async with StreamClient(url, api_key=key, sample_rate=8000, encoding="pcm_mulaw") as s:
            t0 = time.monotonic()

            async def send() -> None:
                for k in range(0, len(data), 160):  # 20 ms frames, real time
                    await s.send_audio(data[k : k + 160])
                    await asyncio.sleep(max(0.0, t0 + (k + 160) / 8000 - time.monotonic()))
                await s.end()

            sender = asyncio.create_task(send())
            async for ev in s:
                if ev["type"] == "final":
                    arrivals.append((time.monotonic(), ev))
            await sender
        text = " ".join(ev["text"] for _, ev in arrivals if ev["text"])
        e, n = corpus.word_errors(c.text, text)
        return s.completed is not None, latencies(c, arrivals, t0), e, n

    res = await asyncio.gather(*(one(i, c) for i, c in enumerate(calls)))
    cpu = proc_cpu_s(os.getpid()) - c0
    lats = [x for r in res for x in r[1]]
    audio_s = sum(c.seconds for c in calls)
    return {"answered": len(res), "completed": sum(bool(r[0]) for r in res), "callers_ok": len(res),
            "wer": sum(r[2] for r in res) / max(1, sum(r[3] for r in res)),
            "lat50": pct(lats, 50), "lat95": pct(lats, 95), "svc_cpu": cpu / audio_s, "worker_cpu": 0.0}


async def bench(args: argparse.Namespace) -> None:
    calls = standard_calls(args.calls, args.seconds)
    with tempfile.TemporaryDirectory(prefix="cb-sipbench-") as tmp:
        wav_dir = Path(tmp)
        for i, c in enumerate(calls):
            corpus.write_wav(wav_dir / f"call{i}.wav", corpus._resample(c.pcm, 16000, 8000), 8000)
        overrides = {"server.sip_port": "0", "sip.workers": str(args.workers), **ADMIT_ALL}
        async with running_service(wav_dir / "data", **overrides) as (svc, url):
            sip = await run_sip(svc, calls, wav_dir)
            ws = await run_socket(svc, url, BENCH_KEY, calls)
    rows = []
    for name, r in (("SIP (PCMU via dispatcher + workers)", sip), ("WebSocket baseline (8 kHz mu-law)", ws)):
        rows.append([name, f"{r['answered']}/{len(calls)}", f"{r['completed']}/{len(calls)}", f"{100 * r['wer']:.1f}",
                     f"{r['lat50']:.2f}", f"{r['lat95']:.2f}", f"{r['svc_cpu']:.3f}", f"{r['worker_cpu']:.3f}"])
    emit_table(
        "sip_capacity",
        f"SIP capacity: {len(calls)} concurrent calls of {args.seconds:.0f} s, {args.workers} SIP workers, "
        f"{os.cpu_count()} cores, model tiny.en, decode pool = cores",
        ["ingress", "answered", "jobs completed", "WER %", "final lat p50 s", "p95 s",
         "service CPU s/audio s", "SIP workers CPU s/audio s"],
        rows,
        notes=[f"ratio SIP / socket: final latency p50 x{sip['lat50'] / ws['lat50']:.2f}, p95 x{sip['lat95'] / ws['lat95']:.2f}, "
               f"CPU (service + workers) x{(sip['svc_cpu'] + sip['worker_cpu']) / max(1e-9, ws['svc_cpu']):.2f}",
               "CPU s per audio s: 1.0 would be one core per call; callers (the far end) are not counted.",
               f"each SIP worker process: {100 * sip['worker_idle_share']:.1f} % of a core idle ({IDLE_S:.0f} s "
               f"before the calls), {100 * sip['worker_busy_share']:.1f} % while the calls ran "
               f"({len(calls) / sip['workers']:.1f} calls per worker on average; "
               "wall time from the first INVITE to the last call_ended)"],
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=4)
    asyncio.run(bench(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
