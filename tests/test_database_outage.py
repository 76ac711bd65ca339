"""The database goes away under a live call and comes back: a real PostgreSQL server of this test's
own, stopped (fast shutdown: its sessions cut, as in a crash or failover) and started again on the
same port while a stream session is transcribing.

What must hold (issue 13, "Bad input and faults"): the session keeps getting its finals, /healthz
says `degraded` while writes wait, nothing the client was sent is lost (every final it received
is in the saved job, once), and the service recovers without a restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from bench import corpus
from bench.calls import speech_bounds
from bridge.client.stream import StreamClient
from tests.pg import PgServer
from tests.webhook_receiver import Receiver
from tests.serving import API_KEY, start_server

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["I would like to check the status of my order, please.",
             "Please send the invoice to the billing department today.",
             "Thank you very much for your help with this problem."]


@pytest.fixture
def own_pg():
    """A PostgreSQL server only this test stops and starts (the session's shared one must not)."""
    srv = PgServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def _utterance(text: str) -> bytes:
    voice = corpus.synthesize(text, rate=160)
    a, b = speech_bounds(voice)
    return np.concatenate([np.zeros(3200, np.int16), voice[a:b], np.zeros(3200, np.int16)]).tobytes()


async def _say(s: StreamClient, pcm: bytes) -> dict:
    """Send one utterance, force its end, and return its final."""
    for i in range(0, len(pcm), 3200):
        await s.send_audio(pcm[i:i + 3200])
        await asyncio.sleep(0.005)
    await s.force_endpoint()
    while True:
        ev = await asyncio.wait_for(s._next(), 60)
        assert ev is not None, "the session closed"
        if ev["type"] == "final":
            return ev


async def _health(http: aiohttp.ClientSession) -> dict:
    async with http.get("/healthz") as r:
        return await r.json()


async def _until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.2)


async def test_a_live_call_keeps_its_finals_through_a_postgresql_restart(tmp_path, pool, own_pg):
    rx = await Receiver().start()
    hook = json.dumps([{"name": "crm", "url": rx.url, "secret": "s" * 24, "events": ["final", "call_ended"]}])
    srv = await start_server(tmp_path / "data", pool, **{"storage.url": own_pg.new_database(),
                                                          "webhooks.endpoints": hook})
    try:
        async with aiohttp.ClientSession(srv.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            received = []
            async with StreamClient(srv.url, api_key=API_KEY, interim_results=False) as s:
                received.append(await _say(s, _utterance(SENTENCES[0])))
                assert (await _health(http))["status"] == "ok"

                await asyncio.to_thread(own_pg.halt)
                received.append(await _say(s, _utterance(SENTENCES[1])))  # transcribed while the database is down
                health = await _health(http)
                assert health["status"] == "degraded", health
                assert health["database"]["ok"] is False and health["database"]["pending_writes"] >= 1, health

                await asyncio.to_thread(own_pg.resume)
                received.append(await _say(s, _utterance(SENTENCES[2])))
                await s.end()
                async for ev in s:
                    if ev["type"] == "final":
                        received.append(ev)
                job_id = s.job_id
                assert s.completed is not None

            async def caught_up():
                h = await _health(http)
                return h if h["database"]["pending_writes"] == 0 else None

            health = await _until(caught_up, 60, "the deferred writes to land")
            assert health["status"] == "ok", health
            async with http.get(f"/v1/jobs/{job_id}") as r:
                job = await r.json()
            await rx.wait_for(lambda r: r.ended(job_id))
        for said, final in zip(SENTENCES, received):
            assert corpus.wer(said, final["text"]) < 0.35, (said, final["text"])
        assert job["status"] == "completed"
        # every final the client was sent is saved, once, in order
        assert [g["text"] for g in job["segments"]] == [f["text"] for f in received if f["text"]]
        assert job["duration_s"] == pytest.approx(sum(len(_utterance(t)) for t in SENTENCES) / 2 / 16000, abs=0.05)
        # and the webhooks of the outage went out once it was over, each once, in order
        hooked = rx.events(job_id)
        assert [e["text"] for e in hooked if e["type"] == "final"] == [f["text"] for f in received]
        assert [e["type"] for e in hooked][-1] == "call_ended" and hooked[-1]["status"] == "completed"
    finally:
        await srv.stop()
        await rx.stop()


def test_serve_with_the_database_down_says_so_in_one_line(tmp_path):
    """PostgreSQL down at start: one clear error line on stderr, no traceback, a non-zero exit."""
    port = _closed_port()
    env = {**os.environ, "CALLBRIDGE_SIP_ENABLED": "false", "PYTHONPATH": str(ROOT),
           "CALLBRIDGE_STORAGE_URL": f"postgresql://cb:secret@127.0.0.1:{port}/calls"}
    r = subprocess.run([sys.executable, "-m", "bridge", "serve", "--data-dir", str(tmp_path / "data"),
                        "--http-port", str(_closed_port())], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("{")]  # JSON log lines aside
    assert len(lines) == 1 and "Traceback" not in r.stdout + r.stderr, r.stderr
    assert lines[0].startswith(f"callbridge: error: cannot start: cannot open 127.0.0.1:{port}/calls: ") and \
        "Connection refused" in lines[0] and "secret" not in lines[0], lines


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_an_outage_longer_than_the_ttl_takes_no_live_node_over(tmp_path, pool, own_pg):
    """Every node's beats fail while the database is away, so when it returns every row is older
    than the TTL; the first node back must not take the others over (they are alive and mid-call):
    a node looks for dead ones only after its own beats have landed for a TTL without a gap."""
    url = own_pg.new_database()
    fast = {"storage.url": url, "cluster.heartbeat_s": "0.2", "cluster.node_ttl_s": "1"}
    a = await start_server(tmp_path / "a", pool, **fast, **{"cluster.node_id": "node-a"})
    b = await start_server(tmp_path / "b", pool, **fast, **{"cluster.node_id": "node-b"})
    try:
        async with StreamClient(b.url, api_key=API_KEY, interim_results=False) as s:
            received = [await _say(s, _utterance(SENTENCES[0]))]
            await asyncio.to_thread(own_pg.halt)
            await asyncio.sleep(2.5)  # the outage itself: longer than the TTL (1 s) by design
            await asyncio.to_thread(own_pg.resume)

            async def both_beating_for_a_ttl():
                return all(n.service.heartbeat.may_reap(time.time()) for n in (a, b))

            await _until(both_beating_for_a_ttl, 60, "both nodes to beat for a TTL again")
            await asyncio.sleep(0.5)  # a few more looks by each node, now allowed to take over
            assert a.service.heartbeat.taken_over == [] and b.service.heartbeat.taken_over == []
            received.append(await _say(s, _utterance(SENTENCES[1])))
            job = await b.service.store.get_job(s.job_id)
            assert job.status.value == "live" and job.node_id == "node-b"
        job = await b.service.store.get_job(s.job_id)
        assert job.status.value == "completed"
        assert [g.text for g in await b.service.store.segments(s.job_id)] == [f["text"] for f in received]
    finally:
        await b.stop()
        await a.stop()
