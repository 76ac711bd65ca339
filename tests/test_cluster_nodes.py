"""Nodes sharing one database (docs/cluster.md): the per-key session limit counts every node's
sessions; a restarting node fails only its own live jobs; a node killed with kill -9 has its live
job failed by a survivor once its heartbeat expires (finals kept, credits settled, the webhook
`call_ended` delivered once); two survivors racing for one dead node split its jobs, each taken
once. Real services (two in one process, or a real `callbridge serve` subprocess), real
PostgreSQL (tests/pg.py) and, where two processes on one file apply, real SQLite.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal

import aiohttp
import numpy as np
import pytest

from bridge.client.stream import StreamClient, StreamError
from bridge.cluster import load_node_id
from bridge.config import ConfigError, load_config
from bridge.jobs.model import Job, JobSource, JobStatus, new_job_id
from bridge.stores import DEAD_NODE_REASON, SessionLimitReached, Stores, open_stores
from bridge.stores.sqlite import url_for
from tests import pg
from tests.serving import API_KEY, start_server
from tests.test_service_process import Serve
from tests.test_stream_api import EN, SR, collect, finals, send_paced, sil, speech
from tests.webhook_receiver import Receiver

SECRET = "test-secret-0123456789abcdef"


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(request, tmp_path) -> str:
    """One database two nodes share: a PostgreSQL database, or one SQLite file (two processes on
    one machine)."""
    if request.param == "sqlite":
        return url_for(tmp_path / "shared" / "callbridge.db")
    return request.getfixturevalue("pg_server").new_database()


@pytest.fixture
def pg_url(pg_server: pg.PgServer) -> str:
    return pg_server.new_database()


def _node(shared_url: str, **extra: str) -> dict[str, str]:
    return {"storage.url": shared_url, **extra}


async def _healthz(url: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(url + "/healthz") as r:
        return await r.json()


# --------------------------------------------------------------------------- identity


def test_node_id_is_created_once_and_kept(tmp_path):
    data = tmp_path / "data"
    first = load_node_id(load_config({"data_dir": str(data)}, env={}))
    assert first.startswith("node_") and (data / "node_id").read_text().strip() == first
    assert load_node_id(load_config({"data_dir": str(data)}, env={})) == first
    assert load_node_id(load_config({"data_dir": str(data)}, env={"CALLBRIDGE_CLUSTER_NODE_ID": "edge-1"})) == "edge-1"
    with pytest.raises(ConfigError, match="cluster.node_id must be"):
        load_node_id(load_config({"data_dir": str(data), "cluster.node_id": "a b"}, env={}))


def test_a_ttl_not_longer_than_the_heartbeat_is_refused():
    with pytest.raises(ConfigError, match=r"cluster.node_ttl_s \(2\) must be longer than cluster.heartbeat_s \(2\)"):
        load_config({"cluster.node_ttl_s": "2"}, env={})


# --------------------------------------------------------------------------- (a) session limit


async def test_a_keys_session_limit_counts_sessions_on_every_node(tmp_path, pool, shared_url):
    """Limit 1: a stream open on node A makes node B refuse the key's second session with
    RATE_LIMITED; once A's session has ended, B admits it. (Before, each node counted only its
    own sessions, so B admitted the second one.)"""
    a = await start_server(tmp_path / "a", pool, **_node(shared_url, **{"limits.max_sessions_per_key": "1"}))
    b = await start_server(tmp_path / "b", pool, **_node(shared_url, **{"limits.max_sessions_per_key": "1"}))
    try:
        assert a.service.node_id != b.service.node_id
        pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(1.2)])
        async with StreamClient(a.url, api_key=API_KEY) as first:
            assert first.ready
            with pytest.raises(StreamError) as refused:
                async with StreamClient(b.url, api_key=API_KEY):
                    pass
            assert refused.value.code == "RATE_LIMITED"
            assert refused.value.message == "1 sessions already live for this key (limit 1)"
            await send_paced(first, pcm.tobytes(), SR * 2)
            await first.end()
            events = await collect(first)
        assert events[-1]["type"] == "completed" and finals(events)
        async with StreamClient(b.url, api_key=API_KEY) as again:  # A's session ended: its row is gone
            assert again.ready
            with pytest.raises(StreamError) as refused:  # and B's own counts on A
                async with StreamClient(a.url, api_key=API_KEY):
                    pass
            assert refused.value.code == "RATE_LIMITED"
        # each node's /healthz lists both (as its last heartbeat look saw them)
        health = await _healthz(b.url)
        assert health["node_id"] == b.service.node_id
        assert {n["id"] for n in health["nodes"]} == {a.service.node_id, b.service.node_id}
        assert all(n["state"] == "up" for n in health["nodes"])
    finally:
        await b.stop()
        await a.stop()


async def test_concurrent_admissions_on_two_nodes_never_pass_the_limit(shared_url):
    """Store level: twenty sessions of one owner opened at once through two nodes' stores
    (two connection pools, or two SQLite connections), limit 3: exactly three rows, the rest
    refused with the count."""
    a, b = await open_stores(shared_url), await open_stores(shared_url)
    try:
        results = await asyncio.gather(*((a if i % 2 else b).nodes.open_session(f"job_{i}", "jwt:alice", "n", 3)
                                         for i in range(20)), return_exceptions=True)
        assert sum(r is None for r in results) == 3
        assert all(isinstance(r, SessionLimitReached) and (r.live, r.limit) == (3, 3) for r in results if r is not None)
        assert len(await a.nodes.session_jobs()) == 3
        await b.nodes.open_session("job_other_owner", "key_other", "n", 3)  # limits are per owner
    finally:
        await a.close()
        await b.close()


# --------------------------------------------------------------------------- (b) restart


async def test_b_a_restarting_node_fails_only_its_own_live_jobs(tmp_path, pool, shared_url):
    """Node A restarts (stop, start on the same data dir: the same node id) while node B streams:
    A fails the live job its crash left, B's live job stays live and its stream carries on to
    `completed`. (Before, every node's start failed every live job in the database.)"""
    a = await start_server(tmp_path / "a", pool, **_node(shared_url))
    b = await start_server(tmp_path / "b", pool, **_node(shared_url))
    try:
        node_a = a.service.node_id
        # what a crash of A leaves: a live job of A's, with a saved final
        crashed = Job(id=new_job_id(), owner="key_x", source=JobSource.STREAM, speakers=["caller"], node_id=node_a)
        await a.service.store.create_job(crashed)
        await a.service.store.add_segment(crashed.id, {"text": "hello", "start": 0.0, "end": 1.5, "channel": 0,
                                                       "speaker": "caller"})
        pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(1.2)])
        async with StreamClient(b.url, api_key=API_KEY) as on_b:
            await send_paced(on_b, pcm[: len(pcm) // 2].tobytes(), SR * 2)
            await a.stop()
            a = await start_server(tmp_path / "a", pool, **_node(shared_url))
            assert a.service.node_id == node_a  # kept in data_dir/node_id
            assert a.service.recovered_jobs == [crashed.id]
            mine = await b.service.store.get_job(on_b.job_id)
            assert mine.status is JobStatus.LIVE and mine.node_id == b.service.node_id
            await send_paced(on_b, pcm[len(pcm) // 2:].tobytes(), SR * 2)
            await on_b.end()
            events = await collect(on_b)
        assert events[-1]["type"] == "completed" and finals(events)
        failed = await b.service.store.get_job(crashed.id)
        assert failed.status is JobStatus.FAILED and failed.error["code"] == "INTERNAL"
        assert failed.duration_s == 1.5 and [g.text for g in await b.service.store.segments(crashed.id)] == ["hello"]
        assert (await b.service.store.get_job(on_b.job_id)).status is JobStatus.COMPLETED
    finally:
        await b.stop()
        await a.stop()


async def test_fail_live_jobs_of_one_node_leaves_the_others(shared_url, tmp_path):
    """Store level: a node's restart fails its own live jobs and those from before jobs had a
    node (node_id ''), not another node's."""
    stores = await open_stores(shared_url)
    try:
        jobs = {node: Job(id=new_job_id(), owner="k", node_id=node) for node in ("a", "b", "")}
        for job in jobs.values():
            await stores.jobs.create_job(job)
        assert await stores.jobs.fail_live_jobs("restart", "a") == sorted([jobs["a"].id, jobs[""].id])
        assert (await stores.jobs.get_job(jobs["b"].id)).status is JobStatus.LIVE
        assert (await stores.jobs.get_job(jobs["a"].id)).node_id == "a"
    finally:
        await stores.close()


# --------------------------------------------------------------------------- (c) kill -9


async def test_c_a_node_killed_mid_stream_is_taken_over_by_a_survivor(tmp_path, pool, pg_url):
    """`callbridge serve` A streams a metered key's call with finals saved; kill -9. Once A's
    heartbeat is older than the TTL, node B fails A's job (finals kept, the recording on this
    machine repaired), settles its credit reservation from the audio, and the webhook receiver
    gets `call_ended` (failed) for it exactly once, after every saved final."""
    rx = await Receiver().start()
    endpoints = json.dumps([{"name": "crm", "url": rx.url, "secret": SECRET, "events": ["final", "call_ended"]}])
    # a short TTL, yet long enough that a busy test machine never takes the live A for dead
    cluster = {"cluster.heartbeat_s": "0.3", "cluster.node_ttl_s": "3"}
    b = await start_server(tmp_path / "b", pool, **_node(pg_url, **cluster, **{"webhooks.endpoints": endpoints,
                                                                                 "webhooks.backoff_max_s": "1"}))
    try:
        key, secret = await b.service.keys.create_key("metered", credits=100000)
        # A queues its webhooks in the shared outbox and B delivers them: until outbox rows are
        # leased per node (h/outbox), two delivering nodes could both send one row.
        env = {"CALLBRIDGE_API_KEYS": API_KEY, "CALLBRIDGE_STORAGE_URL": pg_url,
               "CALLBRIDGE_CLUSTER_HEARTBEAT_S": "0.3", "CALLBRIDGE_CLUSTER_NODE_TTL_S": "3",
               "CALLBRIDGE_WEBHOOKS_ENDPOINTS": endpoints, "CALLBRIDGE_WEBHOOKS_ENABLED": "false"}
        async with Serve(tmp_path / "a", env) as a:
            node_a = (await _healthz(a.url))["node_id"]
            live = StreamClient(a.url, api_key=secret, max_duration_seconds=600)
            await live.__aenter__()
            pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(1.2), speech(EN[1]), sil(1.2), speech(EN[0][:25])])
            await send_paced(live, pcm.tobytes(), SR * 2, speed=4.0)
            seen: list[dict] = []
            while len(finals(seen)) < 2:
                seen.append(await asyncio.wait_for(live._next(), 30))
            assert (await b.service.keys.open_reservations()).get(live.job_id)  # held while live
            a.proc.send_signal(signal.SIGKILL)
            await a.proc.wait()
            await live.aclose()
        await rx.wait_for(lambda r: r.ended(live.job_id), timeout=60)
        assert b.service.heartbeat.taken_over == [node_a]
        store = b.service.store
        job = await store.get_job(live.job_id)
        assert job.status is JobStatus.FAILED and job.error == {"code": "INTERNAL", "message": DEAD_NODE_REASON}
        assert job.node_id == node_a and job.audio_path
        saved = [g.text for g in await store.segments(live.job_id)]
        assert saved[: len(finals(seen))] == [e["text"] for e in finals(seen)]
        assert job.duration_s >= finals(seen)[-1]["end"]  # the recording (readable here) or the last final
        assert live.job_id not in await b.service.keys.open_reservations()
        charged = 100000 - (await b.service.keys.get_key(key.id)).balance
        assert charged == math.ceil(job.duration_s * 220 / 60) > 0
        assert live.job_id not in await b.service.stores.nodes.session_jobs()
        assert node_a not in {n.id for n in await b.service.stores.nodes.list_nodes()}
        await b.service.webhooks.flush()
        sent = rx.events(live.job_id)
    finally:
        await b.stop()
        await rx.stop()
    ended = [e for e in sent if e["type"] == "call_ended"]
    assert len(ended) == 1 and sent[-1] is ended[0]
    assert ended[0]["status"] == "failed" and ended[0]["recovered"] is True
    assert [e["text"] for e in finals(sent)] == saved  # every saved final, once, before the end
    assert [e["seq"] for e in sent] == sorted(e["seq"] for e in sent)
    assert all(h.verifies(SECRET) for h in rx.hits)


# --------------------------------------------------------------------------- (d) racing survivors


async def _dead_node(stores: Stores, node_id: str, jobs: int) -> list[str]:
    """A node row whose heartbeat is long past, with live jobs (a final each) and session rows."""
    await stores.nodes.heartbeat(node_id, f"http://{node_id}:8080", started_at=1.0, now=2.0)
    ids = []
    for i in range(jobs):
        job = Job(id=new_job_id(), owner="key_x", node_id=node_id, speakers=["caller"])
        await stores.jobs.create_job(job)
        await stores.jobs.add_segment(job.id, {"text": f"final {i}", "start": 0.0, "end": 2.0 + i, "channel": 0,
                                               "speaker": "caller"})
        await stores.nodes.open_session(job.id, "key_x", node_id, None)
        ids.append(job.id)
    return ids


async def test_d_two_survivors_racing_for_dead_nodes_take_each_job_once(shared_url):
    """Two surviving nodes (two openings of one database) take over the same five dead nodes at
    once: each dead node is taken by exactly one of them, each of its jobs failed once, its
    segments kept; a live node's row and jobs are untouched."""
    b, c = await open_stores(shared_url), await open_stores(shared_url)
    try:
        dead = {f"dead-{i}": await _dead_node(b, f"dead-{i}", 3) for i in range(5)}
        await b.nodes.heartbeat("alive", "http://alive:8080", started_at=1.0)
        alive_job = Job(id=new_job_id(), owner="key_x", node_id="alive")
        await b.jobs.create_job(alive_job)
        attempts = [(node, survivor) for node in [*dead, "alive"] for survivor in (b, c)]
        results = await asyncio.gather(*(s.nodes.take_over(node, ttl_s=10.0) for node, s in attempts))
        for node, ids in dead.items():
            takes = [r for (n, _), r in zip(attempts, results, strict=True) if n == node and r is not None]
            assert len(takes) == 1, (node, takes)
            assert takes[0].failed_jobs == sorted(ids) and takes[0].sessions_removed == 3
        assert all(r is None for (n, _), r in zip(attempts, results, strict=True) if n == "alive")
        failed = [j for r in results if r is not None for j in r.failed_jobs]
        assert len(failed) == len(set(failed)) == 15
        for job_id in failed:
            job = await c.jobs.get_job(job_id)
            assert job.status is JobStatus.FAILED and job.error["message"] == DEAD_NODE_REASON
            assert job.duration_s >= 2.0 and len(await c.jobs.segments(job_id)) == 1
        assert [n.id for n in await c.nodes.list_nodes()] == ["alive"]
        assert await c.nodes.session_jobs() == set()
        assert (await c.jobs.get_job(alive_job.id)).status is JobStatus.LIVE
        assert await b.nodes.take_over("dead-0", ttl_s=10.0) is None  # already taken
        # a taken-over node that beats again finds its row gone (and says so: node_was_taken_over)
        assert await c.nodes.heartbeat("alive", "http://alive:8080", started_at=1.0) is True
        assert await c.nodes.heartbeat("dead-0", "http://dead-0:8080", started_at=1.0) is False
    finally:
        await b.close()
        await c.close()
