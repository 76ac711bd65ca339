"""The production topology: Kamailio (Debian 5.6) with the shipped config in front of the workers."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from tests.serving import API_KEY, start_server
from tests.test_service_process import Serve, free_port
from tests.test_sip_service import CALLER, _state, _udp_exchange, leg_text, peer, speech_wav
from tests.test_stream_api import EN, SR, sil, speech

from bench import corpus
from bridge.client.stream import StreamClient

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "config" / "kamailio" / "kamailio.cfg"
pytestmark = pytest.mark.skipif(shutil.which("kamailio") is None, reason="Debian kamailio not installed")


def local_config(tmp: Path, port: int, worker_ports: list[int], maxload: int,
                 priorities: list[int] | None = None) -> Path:
    """The shipped config with this test's port and destination list substituted (nothing else
    changed). `priorities`: per destination; the call-load algorithm breaks ties by them."""
    prio = priorities or [0] * len(worker_ports)
    lst = tmp / "dispatcher.list"
    lst.write_text("".join(f"1 sip:127.0.0.1:{p} 0 {prio[i]} duid=w{i};maxload={maxload}\n"
                           for i, p in enumerate(worker_ports)))
    text = CFG.read_text()
    text = text.replace('"!LISTEN_PORT!5060!g"', f'"!LISTEN_PORT!{port}!g"')
    text = text.replace('"!DISPATCHER_LIST!config/kamailio/dispatcher.list!g"', f'"!DISPATCHER_LIST!{lst}!g"')
    cfg = tmp / "kamailio.cfg"
    cfg.write_text(text)
    return cfg


async def kamailio_ready(kam: asyncio.subprocess.Process, port: int, timeout: float = 30.0) -> None:
    """Until Kamailio answers an OPTIONS to itself on `port` (the config answers those 200)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert kam.returncode is None, f"kamailio exited {kam.returncode}"
        probe = (f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
                 f"Via: SIP/2.0/UDP 127.0.0.1:LOCALPORT;branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"
                 f"Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=ready\r\nTo: <sip:127.0.0.1:{port}>\r\n"
                 f"Call-ID: {uuid.uuid4().hex}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()
        got = await _udp_exchange(port, probe, timeout=0.5)
        if got and got[-1].startswith("SIP/2.0 200"):
            return
    raise AssertionError(f"kamailio did not answer OPTIONS on {port} within {timeout} s")


async def test_shipped_config_parses():
    proc = await asyncio.create_subprocess_exec("kamailio", "-c", "-f", str(CFG), cwd=str(ROOT),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()[-2000:]


async def test_kamailio_spreads_calls_over_workers_and_refuses_when_full(tmp_path, pool):
    """2 workers x maxload 1 behind Kamailio: two concurrent calls are answered on different
    workers and transcribed, a third gets 503, and the load counters come back after BYE."""
    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                         "sip.workers": "2"})
    kam = None
    try:
        svc = srv.service
        port = free_port()
        cfg = local_config(tmp_path, port, [w.port for w in svc.sip.workers], maxload=1)
        run = tmp_path / "run"
        run.mkdir()
        kam = await asyncio.create_subprocess_exec(
            "kamailio", "-f", str(cfg), "-Y", str(run), "-P", str(run / "kamailio.pid"), "-DD", "-E", "-m", "32", "-M", "4",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        await kamailio_ready(kam, port)
        wav = speech_wav(tmp_path / "c.wav", CALLER, tail=3.0)

        async def call(i: int):
            # one after another, each once the earlier ones are answered and still talking
            async def answered() -> bool:
                return len((await svc.store.list_jobs())[0]) >= min(i, 2)

            await _state(answered, 30, f"{min(i, 2)} calls answered")
            return await peer("call", f"sip:k{i}@127.0.0.1:{port}", "--play", str(wav), "--timeout", "30")

        results = await asyncio.gather(*(call(i) for i in range(3)))
        codes = sorted(info["sip_code"] for _, info, _ in results)
        jobs, _ = await svc.store.list_jobs()
        assert codes == [200, 200, 503], (codes, [(j.config.get("worker"), j.created_at, j.ended_at) for j in jobs],
                                          svc.sip.dispatcher.stats().get("workers"))
        jobs, _ = await svc.store.list_jobs()
        assert len(jobs) == 2 and {j.config["worker"] for j in jobs} == {0, 1}
        async def ended() -> bool:
            return all([(await svc.store.get_job(j.id)).status.value != "live" for j in jobs])

        await _state(ended, 30, "jobs ended")
        for j in jobs:
            assert (await svc.store.get_job(j.id)).status.value == "completed"
            assert corpus.wer(CALLER, await leg_text(svc.store, j.id, "caller")) <= 0.15
        # the slots are free again: the next call is answered
        rc, info, err = await peer("call", f"sip:again@127.0.0.1:{port}", "--play", str(wav), "--timeout", "30")
        assert rc == 0 and info["sip_code"] == 200, err
    finally:
        if kam is not None and kam.returncode is None:
            os.killpg(kam.pid, signal.SIGTERM)  # kamailio forks children into its own session
            await asyncio.wait_for(kam.wait(), 10)
        await srv.stop()


async def _sip_jobs(node) -> list[dict]:
    """A node's SIP jobs, over its REST API (each node has its own SQLite here)."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        async with http.get(node.url + "/v1/jobs") as r:
            assert r.status == 200
            return [j for j in (await r.json())["jobs"] if j["source"] == "sip"]


async def _node_sip_port(node) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(node.url + "/healthz") as r:
            return (await r.json())["sip"]["port"]


async def test_kamailio_spreads_calls_over_nodes_and_fails_over(tmp_path):
    """The cluster list (config/kamailio/dispatcher-cluster.list: one line per node's SIP port)
    with the shipped config in front of two `callbridge serve` processes. Node A really holds
    one call although the list says 4 (a node's own answer is the truth: a worker may be down):
    the first two calls go one to each node; the third goes to A first (equal load, and A has
    the higher priority in the list), A's dispatcher answers 503, and Kamailio fails over to B. Then B stops (SIGTERM)
    and the next calls are all answered by A, whether the OPTIONS probe has taken B out already
    or an INVITE to B times out and fails over."""
    rtp = 30000 + random.randrange(0, 300) * 100
    env = {"CALLBRIDGE_API_KEYS": API_KEY, "CALLBRIDGE_SIP_ENABLED": "true", "CALLBRIDGE_SIP_PORT": "0",
           "CALLBRIDGE_SIP_WORKERS": "1"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    kam = None
    async with Serve(tmp_path / "a" / "data", {**env, "CALLBRIDGE_SIP_RTP_PORT_START": str(rtp),
                                               "CALLBRIDGE_SIP_CALLS_PER_WORKER": "1"}) as a, \
            Serve(tmp_path / "b" / "data", {**env, "CALLBRIDGE_SIP_RTP_PORT_START": str(rtp + 100)}) as b:
        try:
            port = free_port()
            nodes = [await _node_sip_port(a), await _node_sip_port(b)]
            cfg = local_config(tmp_path, port, nodes, maxload=4, priorities=[10, 0])
            run = tmp_path / "run"
            run.mkdir()
            kam = await asyncio.create_subprocess_exec(
                "kamailio", "-f", str(cfg), "-Y", str(run), "-P", str(run / "kamailio.pid"), "-DD", "-E", "-m", "32",
                "-M", "4", stdout=asyncio.subprocess.DEVNULL, stderr=open(tmp_path / "kamailio.log", "wb"),
                start_new_session=True)
            await kamailio_ready(kam, port)
            wav = speech_wav(tmp_path / "c.wav", CALLER, tail=2.0)

            async def call(i: int):
                # each once the ones before are answered (alg 10 counts answered calls)
                async def answered() -> bool:
                    return len(await _sip_jobs(a)) + len(await _sip_jobs(b)) >= i

                await _state(answered, 30, f"{i} calls answered")
                return await peer("call", f"sip:n{i}@127.0.0.1:{port}", "--play", str(wav), "--timeout", "30")

            results = await asyncio.gather(call(0), call(1), call(2))
            assert [info["sip_code"] for _, info, _ in results] == [200, 200, 200], [err for _, _, err in results]
            on_a, on_b = await _sip_jobs(a), await _sip_jobs(b)
            assert len(on_a) == 1 and len(on_b) == 2, (on_a, on_b)
            assert (await _dispatcher_stats(a))["rejected"], "the third call did not try node A first"

            async def all_ended() -> bool:
                return all(j["status"] != "live" for j in await _sip_jobs(a) + await _sip_jobs(b))

            await _state(all_ended, 30, "jobs ended")
            for j in await _sip_jobs(a) + await _sip_jobs(b):
                assert j["status"] == "completed", j

            assert b.proc is not None
            b.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(b.proc.wait(), 60) == 0
            for i in (3, 4):
                rc, info, err = await peer("call", f"sip:n{i}@127.0.0.1:{port}", "--play", str(wav), "--timeout", "30")
                assert rc == 0 and info["sip_code"] == 200, err
            assert len(await _sip_jobs(a)) == 3

            async def ended_on_a() -> bool:
                return all(j["status"] != "live" for j in await _sip_jobs(a))

            await _state(ended_on_a, 30, "jobs ended")
            for j in await _sip_jobs(a):
                assert j["status"] == "completed", j
                text = " ".join(s["text"] for s in (await _transcript(a, j["id"])) if s.get("text"))
                assert corpus.wer(CALLER, text) <= 0.15, text
        finally:
            if kam is not None and kam.returncode is None:
                os.killpg(kam.pid, signal.SIGTERM)
                await asyncio.wait_for(kam.wait(), 10)


async def test_kamailio_takes_a_draining_node_out_by_its_options_answer(tmp_path):
    """Node B drains (SIGTERM while it finalizes a long stream's backlog, so it keeps listening):
    its dispatcher answers Kamailio's OPTIONS probe 503, Kamailio marks it inactive, and the next
    call goes to node A without B even seeing the INVITE, although B has the higher priority."""
    rtp = 30000 + random.randrange(0, 300) * 100
    env = {"CALLBRIDGE_API_KEYS": API_KEY, "CALLBRIDGE_SIP_ENABLED": "true", "CALLBRIDGE_SIP_PORT": "0",
           "CALLBRIDGE_SIP_WORKERS": "1", "CALLBRIDGE_LIMITS_DRAIN_TIMEOUT_S": "60"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    backlog = np.concatenate([np.concatenate([speech(EN[i % 2]), sil(0.8)]) for i in range(12)]).tobytes()
    kam = None
    async with Serve(tmp_path / "a" / "data", {**env, "CALLBRIDGE_SIP_RTP_PORT_START": str(rtp)}) as a, \
            Serve(tmp_path / "b" / "data", {**env, "CALLBRIDGE_SIP_RTP_PORT_START": str(rtp + 100)}) as b:
        try:
            port = free_port()
            cfg = local_config(tmp_path, port, [await _node_sip_port(a), await _node_sip_port(b)], maxload=4,
                               priorities=[0, 10])
            run = tmp_path / "run"
            run.mkdir()
            kam = await asyncio.create_subprocess_exec(
                "kamailio", "-f", str(cfg), "-Y", str(run), "-P", str(run / "kamailio.pid"), "-DD", "-E", "-m", "32",
                "-M", "4", stdout=asyncio.subprocess.DEVNULL, stderr=open(tmp_path / "kamailio.log", "wb"),
                start_new_session=True)
            await kamailio_ready(kam, port)
            wav = speech_wav(tmp_path / "c.wav", CALLER, tail=1.0)
            async with StreamClient(b.url, api_key=API_KEY, sample_rate=SR) as long:
                for i in range(0, len(backlog), 64000):
                    await long.send_audio(backlog[i:i + 64000])
                assert b.proc is not None
                b.proc.send_signal(signal.SIGTERM)

                async def probed_while_draining() -> bool:
                    st = await _dispatcher_stats(b)
                    if not st["draining"]:
                        return False
                    seen.setdefault("options", st["options"])
                    return st["options"] >= seen["options"] + 2  # a probe answered 503 after the drain began

                seen: dict[str, int] = {}
                await _state(probed_while_draining, 30, "Kamailio probing node B while it drains")
                invites_b = (await _dispatcher_stats(b))["invites"]
                rc, info, err = await peer("call", f"sip:d@127.0.0.1:{port}", "--play", str(wav), "--timeout", "30")
                assert rc == 0 and info["sip_code"] == 200, err
                st = await _dispatcher_stats(b)
                assert st["draining"], "node B stopped draining before the call: no proof"
                assert st["invites"] == invites_b, "Kamailio still sent the INVITE to the draining node"
                assert len(await _sip_jobs(a)) == 1
                evs = [e async for e in long]
            assert evs[-1]["type"] == "completed" and evs[-1]["server_shutdown"], evs[-1]
            assert await asyncio.wait_for(b.proc.wait(), 90) == 0
        finally:
            if kam is not None and kam.returncode is None:
                os.killpg(kam.pid, signal.SIGTERM)
                await asyncio.wait_for(kam.wait(), 10)


async def _dispatcher_stats(node) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(node.url + "/healthz") as r:
            return (await r.json())["sip"]["dispatcher"]


async def _transcript(node, job_id: str) -> list[dict]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        async with http.get(f"{node.url}/v1/jobs/{job_id}") as r:
            assert r.status == 200, await r.text()
            return (await r.json())["segments"]
