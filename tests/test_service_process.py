"""`callbridge serve` as a real process: first-start key, SIGTERM drain, kill -9 recovery, restart."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import sys
import time
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from bench import corpus
from bridge.client.stream import StreamClient
from tests.serving import API_KEY, start_server
from tests.test_stream_api import EN, SR, collect, finals, send_paced, sil, speech, text_of

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port free for UDP and TCP, outside the kernel's ephemeral range (see sip/ports.py)."""
    from sip.ports import free_sip_port

    return free_sip_port()


class Serve:
    """`python -m bridge serve` on a free port with its own data dir; logs go to a file."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None,
                 until: tuple[str, ...] = ("ok",)) -> None:
        self.data_dir = data_dir
        self.until = until  # the /healthz status that counts as started ("degraded": up, refusing sessions)
        self.port = free_port()
        base = {k: v for k, v in os.environ.items() if k != "CALLBRIDGE_API_KEYS"}
        self.env = {**base, "CALLBRIDGE_MODEL_POOL_SIZE": "1", "CALLBRIDGE_LOGGING_FORMAT": "json",
                    "CALLBRIDGE_LIMITS_DRAIN_TIMEOUT_S": "20", "CALLBRIDGE_SIP_ENABLED": "false", **(env or {})}
        # late finals, or a leg cap following a busy test machine's decode speed, must not refuse
        # sessions (tests/test_capacity.py tests that)
        self.env.setdefault("CALLBRIDGE_CAPACITY_MAX_FINAL_LATENCY_S", "3600")
        self.env.setdefault("CALLBRIDGE_CAPACITY_LEGS_PER_CONTEXT", "8")
        self.proc: asyncio.subprocess.Process | None = None
        self.log = data_dir.parent / f"serve-{self.port}.log"
        self.out = data_dir.parent / f"serve-{self.port}.out"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> "Serve":
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "serve", "--data-dir", str(self.data_dir), "--http-port", str(self.port),
            cwd=str(ROOT), env=self.env, stdout=open(self.out, "wb"), stderr=open(self.log, "wb"))
        deadline = time.monotonic() + 90
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise AssertionError(f"serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
                try:
                    async with http.get(self.url + "/healthz") as r:
                        if (await r.json()).get("status") in self.until:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError("serve did not become healthy in 90 s")

    async def __aexit__(self, *exc) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def stdout(self) -> str:
        return self.out.read_text()


async def test_first_start_creates_key_and_sigterm_drains(tmp_path):
    data = tmp_path / "data"
    async with Serve(data) as srv:
        assert "Created an API key" in srv.stdout()
        key = (data / "api_key").read_text().strip()
        assert key in srv.stdout() and (data / "api_key").stat().st_mode & 0o777 == 0o600
        pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(0.4)])
        async with StreamClient(srv.url, api_key=key) as s:
            await send_paced(s, pcm.tobytes(), SR * 2)
            srv.proc.send_signal(signal.SIGTERM)
            events = await asyncio.wait_for(collect(s), 30)
        # drained: the open utterance was finalized and sent, then completed, then "going away"
        assert events[-1]["type"] == "completed" and s.close_code == 1001
        assert corpus.wer(EN[0], text_of(finals(events))) < 0.2
        assert await asyncio.wait_for(srv.proc.wait(), 30) == 0
        # JSON logs; every line about the session carries its job_id
        lines = [json.loads(x) for x in srv.log.read_text().splitlines() if x.startswith("{")]
        session = [x for x in lines if x.get("logger", "").startswith(("bridge.calls", "bridge.ingress", "bridge.recognizer.streamer"))]
        assert {x["event"] for x in session} >= {"call_started", "session_ready", "call_ended"}
        assert all(x.get("job_id") == s.job_id for x in session), session
    async with Serve(data) as again:  # restart: the key is kept and not printed again
        assert "Created an API key" not in again.stdout()
        async with aiohttp.ClientSession() as http:
            hdr = {"Authorization": f"Bearer {key}"}
            async with http.get(f"{again.url}/v1/jobs/{s.job_id}", headers=hdr) as r:
                job = await r.json()
        assert r.status == 200 and job["status"] == "completed"
        assert [g["text"] for g in job["segments"]] == [e["text"] for e in finals(events)]


async def test_kill_9_mid_session_keeps_audio_and_finals(tmp_path, pool):
    data = tmp_path / "data"
    env = {"CALLBRIDGE_API_KEYS": API_KEY}
    async with Serve(data, env) as srv:
        # one finished job before the crash
        async with StreamClient(srv.url, api_key=API_KEY) as done:
            await send_paced(done, np.concatenate([sil(0.3), speech(EN[1]), sil(1.0)]).tobytes(), SR * 2)
        assert done.completed
        # the live one: two sentences, killed once the first final has arrived
        live = StreamClient(srv.url, api_key=API_KEY)
        await live.__aenter__()
        pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(1.2), speech(EN[1][:30])])
        await send_paced(live, pcm.tobytes(), SR * 2, speed=4.0)
        seen = []
        while not finals(seen):
            seen.append(await asyncio.wait_for(live._next(), 20))
        await asyncio.sleep(1.2)  # the recorder rewrites its header every second of audio
        srv.proc.send_signal(signal.SIGKILL)
        await srv.proc.wait()
        await live.aclose()
    # restart on the same data dir (in-process server, same SQLite file and recordings)
    srv2 = await start_server(data, pool)
    try:
        assert live.job_id in srv2.service.recovered_jobs
        store = srv2.service.store
        job = await store.get_job(live.job_id)
        assert job.status.value == "failed" and job.error["code"] == "INTERNAL"
        saved = [g.text for g in await store.segments(live.job_id)]
        assert saved[: len(finals(seen))] == [e["text"] for e in finals(seen)]
        assert corpus.wer(EN[0], saved[0]) < 0.2
        with wave.open(job.audio_path) as w:  # the recording is readable and holds what was received
            got = w.getnframes() / w.getframerate()
        sent_before_final = finals(seen)[0]["end"]
        assert got >= sent_before_final, (got, sent_before_final)
        assert (await store.get_job(done.job_id)).status.value == "completed"
        assert [g.text for g in await store.segments(done.job_id)]
    finally:
        await srv2.stop()


async def test_kill_9_before_any_final_bills_the_audio_received(tmp_path, pool):
    """A stream killed (kill -9) before its first final is billed for the audio it sent, and its
    recording's header says how much audio the file holds, once the service restarts."""
    from bridge.stores.sqlite.keys import SqliteKeyStore

    data = tmp_path / "data"
    data.mkdir()
    keys = SqliteKeyStore(str(data / "callbridge.db"))
    key, secret = keys.create_key("metered", credits=1000)
    keys.close()
    # no usage ticks (they flush the recording's header too): only the recorder's own autoflush runs
    env = {"CALLBRIDGE_CREDITS_USAGE_INTERVAL_S": "600"}
    async with Serve(data, env) as srv:
        live = StreamClient(srv.url, api_key=secret, max_duration_seconds=60)
        await live.__aenter__()
        await live.send_audio(sil(3.0))  # >= 1 s: the header is rewritten to 3.0 s
        await live.send_audio(sil(0.5))  # < 1 s more: in the file, not yet in the header
        async with aiohttp.ClientSession() as http:  # wait until the service has received all 3.5 s
            hdr = {"Authorization": f"Bearer {secret}"}
            while True:
                async with http.get(f"{srv.url}/v1/jobs/{live.job_id}", headers=hdr) as r:
                    if (await r.json())["duration_s"] >= 3.5:
                        break
                await asyncio.sleep(0.05)
        srv.proc.send_signal(signal.SIGKILL)
        await srv.proc.wait()
        await live.aclose()
    srv2 = await start_server(data, pool)
    try:
        job = await srv2.service.store.get_job(live.job_id)
        assert job.status.value == "failed" and not await srv2.service.store.segments(live.job_id)  # no final
        assert job.duration_s == pytest.approx(3.5)
        with wave.open(job.audio_path) as w:
            assert w.getnframes() == 3.5 * SR  # the header matches the audio in the file
        assert os.path.getsize(job.audio_path) == 44 + 3.5 * SR * 2
        charged = 1000 - (await srv2.service.keys.get_key(key.id)).balance
        assert charged == math.ceil(3.5 * 220 / 60)  # 13 credits, not 0
        assert await srv2.service.keys.open_reservations() == {}
    finally:
        await srv2.stop()


async def first_final(srv: Serve, timeout: float = 60.0) -> dict:
    """Wait, through REST, until the first job has a saved final; returns that job."""
    hdr = {"Authorization": f"Bearer {API_KEY}"}
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(headers=hdr) as http:
        while time.monotonic() < deadline:
            async with http.get(srv.url + "/v1/jobs") as r:
                jobs = (await r.json())["jobs"]
            if jobs:
                async with http.get(f"{srv.url}/v1/jobs/{jobs[-1]['id']}") as r:
                    job = await r.json()
                if any(g["text"] for g in job["segments"]):
                    return job
            await asyncio.sleep(0.2)
    raise AssertionError(f"no final saved within {timeout} s")


async def test_serve_with_sip_call_then_sigterm_hangs_up_and_leaves_no_workers(tmp_path):
    """`serve` with SIP on: `callbridge call` reaches it; SIGTERM ends the live call cleanly
    (BYE to the caller, job completed with what was said) and no worker process outlives it."""
    from tests.test_sip_service import CALLER, speech_wav

    data = tmp_path / "data"
    sip_port = free_port()
    env = {"CALLBRIDGE_API_KEYS": API_KEY, "CALLBRIDGE_SIP_ENABLED": "true", "CALLBRIDGE_SIP_PORT": str(sip_port),
           "CALLBRIDGE_SIP_WORKERS": "2", "CALLBRIDGE_SIP_WORKER_BASE_PORT": "0"}
    wav = speech_wav(tmp_path / "c.wav", CALLER, tail=8.0)
    async with Serve(data, env) as srv:
        async with aiohttp.ClientSession() as http:
            async with http.get(srv.url + "/healthz") as r:
                health = await r.json()
        assert health["sip"]["listening"] and len(health["sip"]["workers"]) == 2
        caller = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "call", f"sip:support@127.0.0.1:{sip_port}", "--play", str(wav), "--json",
            cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await first_final(srv)  # the sentence has been said; the call is still up (8 s of silence follow)
        logs = [json.loads(x) for x in srv.log.read_text().splitlines() if x.startswith("{")]
        worker_pids = [x["pid"] for x in logs if x.get("event") == "sip_worker_spawned"]
        assert len(worker_pids) == 2
        srv.proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(caller.communicate(), 30)
        assert await asyncio.wait_for(srv.proc.wait(), 30) == 0
    info = json.loads([x for x in out.decode().splitlines() if x.startswith("{")][-1])
    assert info["sip_code"] == 200 and info["hangup_by"] == "remote", err.decode()
    for pid in worker_pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    from bridge.stores.sqlite.jobs import SqliteJobStore

    store = SqliteJobStore(data / "callbridge.db")
    try:
        (job,), _ = store.list_jobs()
        assert job.source.value == "sip" and job.status.value == "completed"
        assert job.metadata["ended_by"] == "shutdown"
        text = " ".join(g.text for g in store.segments(job.id))
        assert corpus.wer(CALLER, text) <= 0.15, text
    finally:
        store.close()


async def wait_log(srv: Serve, event: str, timeout: float = 30.0, **match) -> dict:
    """The first JSON log line of `srv` with this event (and fields), as it is written."""
    deadline = time.monotonic() + timeout
    while True:
        for x in srv.log.read_text().splitlines():
            if x.startswith("{"):
                line = json.loads(x)
                if line.get("event") == event and all(line.get(k) == v for k, v in match.items()):
                    return line
        if time.monotonic() > deadline or srv.proc.returncode is not None:
            raise AssertionError(f"no {event} {match} in the log of serve (rc {srv.proc.returncode})")
        await asyncio.sleep(0.1)


async def unread_on(path: str, pid: int, timeout: float = 10.0) -> None:
    """Until a Unix socket of `pid` accepted on `path` has bytes queued unread (from `ss -x`,
    iproute2; without it the kill may find the channel drained, which is the easier case)."""
    if shutil.which("ss") is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = await asyncio.create_subprocess_exec("ss", "-xnp", stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        for line in out.decode().splitlines():
            f = line.split()
            if len(f) > 4 and f[4] == path and f"pid={pid}," in line and int(f[2]) > 0:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing queued unread on {path} in {timeout} s")


async def test_kill_9_during_sip_call_workers_die_and_next_serve_takes_the_ports(tmp_path):
    """kill -9 of `serve` while a worker holds a call: that worker hangs up and exits by itself
    (PR_SET_PDEATHSIG / control channel); a worker that could not (SIGSTOPped here) is ended by
    the next `serve` on the same data dir, which then binds the same ports and answers a call."""
    from sip.leftovers import PID_FILE, ProcessId, wait_exited
    from sip.ports import free_sip_port
    from tests.test_sip_service import CALLER, speech_wav

    data = tmp_path / "data"
    sip_port = free_sip_port(span=3)  # the dispatcher, then its 2 workers on the next ports
    env = {"CALLBRIDGE_API_KEYS": API_KEY, "CALLBRIDGE_SIP_ENABLED": "true", "CALLBRIDGE_SIP_PORT": str(sip_port),
           "CALLBRIDGE_SIP_WORKERS": "2", "CALLBRIDGE_SIP_WORKER_BASE_PORT": "0"}
    long_wav = speech_wav(tmp_path / "long.wav", CALLER, tail=30.0)
    async with Serve(data, env) as srv:
        spawned = {}
        for wid in (0, 1):
            spawned[wid] = (await wait_log(srv, "sip_worker_spawned", worker=wid))["pid"]
        procs = {wid: ProcessId.of(pid) for wid, pid in spawned.items()}
        control = json.loads((data / PID_FILE).read_text())["control"]
        caller = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sip.peer", "call", f"sip:support@127.0.0.1:{sip_port}", "--play", str(long_wav),
            cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        busy = (await wait_log(srv, "sip_call_started"))["worker"]
        idle = 1 - busy
        os.kill(spawned[idle], signal.SIGSTOP)  # cannot act on any signal but SIGKILL
        # a stalled service: the worker's audio piles up unread, so the kill resets the channel
        srv.proc.send_signal(signal.SIGSTOP)
        await unread_on(control, srv.proc.pid)
        srv.proc.send_signal(signal.SIGKILL)
        await srv.proc.wait()
        assert await wait_exited(procs[busy], 20), f"worker {busy} outlived the service"
        out, err = await asyncio.wait_for(caller.communicate(), 30)
        info = json.loads(out.decode().splitlines()[-1])
        assert info["sip_code"] == 200 and info["hangup_by"] == "remote", err.decode()[-1000:]  # it got a BYE
        assert procs[idle].alive() and Path(control).parent.is_dir()
    wav = speech_wav(tmp_path / "c.wav", CALLER)
    try:
        async with Serve(data, env) as again:  # same data dir, same SIP ports
            assert not procs[idle].alive() and not Path(control).parent.exists()
            again_pids = {(await wait_log(again, "sip_worker_spawned", worker=w))["pid"] for w in (0, 1)}
            assert not again_pids & set(spawned.values())
            rc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sip.peer", "call", f"sip:support@127.0.0.1:{sip_port}", "--play", str(wav),
                cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(rc.communicate(), 60)
            assert rc.returncode == 0 and json.loads(out.decode().splitlines()[-1])["sip_code"] == 200, err.decode()
            await wait_log(again, "sip_call_ended")
    finally:
        if procs[idle].alive():
            os.kill(procs[idle].pid, signal.SIGKILL)
