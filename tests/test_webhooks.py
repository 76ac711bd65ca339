"""Webhooks end to end: real service, real model, real HTTP receiver on loopback (docs/events.md).

The tests about what the outbox and the endpoint table keep (order, redelivery, restarts, endpoint
changes, recovery after a crash) run on each storage backend (the `storage` fixture: SQLite and a
real PostgreSQL); the scheduler's fairness, breakers and a SIGKILLed process stay on SQLite.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import aiohttp
import numpy as np
import pytest

from bench import corpus
from bench.webhooks import socket_arrivals
from bridge.auth import key_id_for
from bridge.client.stream import StreamClient
from bridge.events.types import Final
from bridge.webhooks.model import ALL_EVENT_TYPES
from bridge.webhooks.signing import sign, verify
from tests.serving import API_KEY, OTHER_KEY, start_server
from tests.test_stream_api import EN, SR, send_paced, sil, speech, text_of
from tests.webhook_receiver import ALLOW_LOOPBACK, HangingReceiver, Receiver

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}
SECRET = "test-secret-0123456789abcdef"
FAST_RETRY = {"webhooks.backoff_initial_s": "0.3", "webhooks.backoff_max_s": "2", **ALLOW_LOOPBACK}


@pytest.fixture
async def server(tmp_path, pool, storage):
    """The real service on each storage backend, letting key-owned endpoints reach the receivers
    on 127.0.0.1."""
    srv = await start_server(tmp_path / "data", pool, **ALLOW_LOOPBACK, **storage)
    yield srv
    await srv.stop()


async def create_hook(http: aiohttp.ClientSession, server, url: str, headers=AUTH, **spec) -> dict:
    async with http.post(f"{server.url}/v1/webhooks", json={"url": url, **spec}, headers=headers) as r:
        body = await r.json()
        assert r.status == 201, body
        return body


async def stream_speech(server, sentences: list[str], key: str = API_KEY) -> tuple[str, list[dict]]:
    """One real stream session; returns its job id and every event the client got."""
    async with StreamClient(server.url, api_key=key) as s:
        audio = np.concatenate([sil(0.3)] + [np.concatenate([speech(t), sil(1.2)]) for t in sentences])
        await send_paced(s, audio.tobytes(), SR * 2)
        await s.end()
        events = [ev async for ev in s]
        return s.job_id, events


def docs_verify():
    """The Python `verify` snippet of docs/webhooks.md, executed as a reader would paste it."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "webhooks.md").read_text()
    block = text.split("## Verifying a delivery", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    ns: dict = {}
    exec(block, ns)  # noqa: S102 - our own documentation
    return ns["verify"]


def finals(evs: list[dict]) -> list[dict]:
    return [e for e in evs if e["type"] == "final"]


def shape(e: dict) -> tuple:
    return (e["channel"], e["start"], e["end"], e["text"])


async def test_every_final_once_in_order_signed(server):
    rx = await Receiver().start()
    try:
        async with aiohttp.ClientSession() as http:
            hook = await create_hook(http, server, rx.url, secret=SECRET, events=["call_started", "final", "call_ended"])
            assert hook["secret"] == SECRET and hook["events"] == ["call_started", "final", "call_ended"]
            job_id, got = await stream_speech(server, EN)
            await rx.wait_for(lambda r: r.ended(job_id))
            async with http.get(f"{server.url}/v1/webhooks/{hook['id']}/deliveries", headers=AUTH) as r:
                log = await r.json()
            async with http.get(f"{server.url}/metrics") as r:
                metrics = await r.text()
    finally:
        await rx.stop()
    sent = rx.events(job_id)
    assert [e["type"] for e in sent][0] == "call_started" and sent[-1]["type"] == "call_ended"
    assert {e["type"] for e in sent} == {"call_started", "final", "call_ended"}  # no partials, no usage
    # every final the client saw, once each, in the same order, with the socket's seq
    assert [shape(e) for e in finals(sent)] == [shape(e) for e in finals(got)]
    assert len(finals(sent)) >= 2 and corpus.wer(" ".join(EN), text_of(finals(sent))) < 0.2
    assert [e["seq"] for e in sent] == sorted(e["seq"] for e in sent)
    assert sent[-1]["status"] == "completed"
    hits = [h for h in rx.hits if h.event["job_id"] == job_id]
    assert len({h.headers["X-Event-Id"] for h in hits}) == len(hits)
    for h in hits:
        assert h.verifies(SECRET)
        assert h.headers["X-Signature"] == sign(SECRET, h.headers["X-Timestamp"], h.body)
        assert abs(int(h.headers["X-Timestamp"]) - time.time()) < 120
    # a receiver rejects a tampered body, a wrong secret and a replayed (stale) timestamp
    h = hits[1]
    tampered = h.body.replace(b'"text":"', b'"text":"not ', 1)
    assert tampered != h.body and not verify(SECRET, h.headers["X-Timestamp"], tampered, h.headers["X-Signature"])
    assert not h.verifies("another-secret-0123456789")
    stale = str(int(h.headers["X-Timestamp"]) - 3600)
    assert not verify(SECRET, stale, h.body, sign(SECRET, stale, h.body))
    # the verification code in docs/webhooks.md, run as written, agrees
    documented = docs_verify()
    assert all(documented(SECRET, h.headers["X-Timestamp"], h.body, h.headers["X-Signature"]) for h in hits)
    assert not documented(SECRET, h.headers["X-Timestamp"], tampered, h.headers["X-Signature"])
    # the delivery log shows each one delivered at the first attempt
    delivered = [ln for ln in metrics.splitlines() if ln.startswith('callbridge_webhook_attempts_total{result="delivered"}')]
    assert delivered and float(delivered[0].split()[-1]) >= len(hits), metrics
    mine = [d for d in log["deliveries"] if d["job_id"] == job_id]
    assert len(mine) == len(hits) and all(d["status"] == "delivered" and d["attempts"] == 1 for d in mine)
    assert sorted(d["event_id"] for d in mine) == sorted(h.headers["X-Event-Id"] for h in hits)


async def test_receiver_down_30s_and_service_restart_loses_nothing(tmp_path, pool):
    """The receiver is down (connection refused) for 30 s, during which the job runs and the
    service is restarted; once it is up, every event arrives, in order, exactly once."""
    data = tmp_path / "data"
    rx = Receiver()
    down_at = time.monotonic()
    srv = await start_server(data, pool, **FAST_RETRY)
    try:
        async with aiohttp.ClientSession() as http:
            hook = await create_hook(http, srv, rx.url, secret=SECRET)
            job_id, got = await stream_speech(srv, EN)
            await asyncio.sleep(1.5)
            async with http.get(f"{srv.url}/v1/webhooks/{hook['id']}/deliveries?status=pending", headers=AUTH) as r:
                pending = (await r.json())["deliveries"]
        assert pending and any(d["attempts"] >= 1 and "Connect" in (d["last_error"] or "") for d in pending)
    finally:
        await srv.stop()
    restarted = time.time()
    srv = await start_server(data, pool, **FAST_RETRY)
    try:
        await asyncio.sleep(max(0.0, 30.0 - (time.monotonic() - down_at)))
        # still down: the restarted service kept trying (refused), and nothing counts as delivered
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{srv.url}/v1/webhooks/{hook['id']}/deliveries", headers=AUTH) as r:
                down_log = (await r.json())["deliveries"]
        assert down_log and all(d["status"] == "pending" and d["delivered_at"] is None for d in down_log)
        retried = [d for d in down_log if (d["last_attempt_at"] or 0) > restarted]
        assert retried and all("Connect" in d["last_error"] for d in retried), down_log
        await rx.start()
        await rx.wait_for(lambda r: r.ended(job_id), timeout=60)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{srv.url}/v1/webhooks/{hook['id']}/deliveries", headers=AUTH) as r:
                log = (await r.json())["deliveries"]
    finally:
        await rx.stop()
        await srv.stop()
    sent = rx.events(job_id)
    assert sent[0]["type"] == "call_started" and sent[-1]["type"] == "call_ended"
    assert [shape(e) for e in finals(sent)] == [shape(e) for e in finals(got)] and len(finals(sent)) >= 2
    assert [e["seq"] for e in sent] == sorted(e["seq"] for e in sent)
    assert len({h.headers["X-Event-Id"] for h in rx.hits}) == len(rx.hits)  # each once
    assert all(h.verifies(SECRET) for h in rx.hits)
    assert all(d["status"] == "delivered" for d in log) and max(d["attempts"] for d in log) >= 2


async def test_dead_after_retry_period_then_redeliver_in_order(tmp_path, pool, storage):
    rx = await Receiver().start()
    rx.status = 500
    srv = await start_server(tmp_path / "data", pool, **{**FAST_RETRY, "webhooks.retry_period_s": "1", **storage})
    try:
        async with aiohttp.ClientSession() as http:
            hook = await create_hook(http, srv, rx.url, secret=SECRET, events=["final", "call_ended"])
            job_id, got = await stream_speech(srv, EN[:1])
            base = f"{srv.url}/v1/webhooks/{hook['id']}"

            async def dead() -> list[dict]:
                async with http.get(f"{base}/deliveries?status=dead", headers=AUTH) as r:
                    return (await r.json())["deliveries"]

            deadline = time.monotonic() + 30
            while len(await dead()) < len(finals(got)) + 1:
                assert time.monotonic() < deadline, "deliveries never went dead"
                await asyncio.sleep(0.3)
            rows = await dead()
            assert all(d["last_status"] == 500 and "receiver says no" in d["last_error"] for d in rows)
            # the receiver saw every one of those attempts, answered each with a 500, and none else
            tried = Counter(h.headers["X-Event-Id"] for h in rx.requests)
            assert tried == {d["event_id"]: d["attempts"] for d in rows} and all(d["attempts"] >= 1 for d in rows)
            assert {h.status for h in rx.requests} == {500} and rx.hits == []
            rx.status = 200
            async with http.post(f"{base}/deliveries/{rows[-1]['id']}/redeliver", headers=AUTH) as r:
                assert r.status == 202 and (await r.json()) == {"redelivered": 1}
            await rx.wait_for(lambda r: len(r.hits) == 1)
            async with http.post(f"{base}/redeliver", headers=AUTH) as r:
                assert r.status == 202 and (await r.json())["redelivered"] == len(rows) - 1
            await rx.wait_for(lambda r: r.ended(job_id))
            async with http.get(f"{base}/deliveries/{rows[0]['id']}", headers=AUTH) as r:
                one = await r.json()
    finally:
        await rx.stop()
        await srv.stop()
    sent = rx.events(job_id)
    # the single redelivery (the oldest row) first, then the rest in their original order
    assert [shape(e) for e in finals(sent)] == [shape(e) for e in finals(got)]
    assert sent[-1]["type"] == "call_ended"
    assert one["status"] == "delivered" and one["event"]["job_id"] == job_id


async def test_crud_validation_isolation_and_partials_opt_in(server):
    rx = await Receiver().start()
    try:
        async with aiohttp.ClientSession() as http:
            base = f"{server.url}/v1/webhooks"
            for bad, needle in [({"url": "ftp://x/y"}, "http"), ({}, "url is required"),
                                ({"url": rx.url, "secret": "short"}, "secret"),
                                ({"url": rx.url, "events": ["final", "nope"]}, "events"),
                                ({"url": rx.url, "events": []}, "at least one"),
                                ({"url": rx.url, "sources": ["fax"]}, "sources"),
                                ({"url": rx.url, "color": "red"}, "unknown")]:
                async with http.post(base, json=bad, headers=AUTH) as r:
                    body = await r.json()
                    assert r.status == 400 and body["error"]["code"] == "INVALID_REQUEST", bad
                    assert needle in body["error"]["message"], (needle, body)
            async with http.post(base, data=b"{not json", headers=AUTH) as r:
                assert r.status == 400
            async with http.post(base, json={"url": rx.url}) as r:
                assert r.status == 401 and (await r.json())["error"]["code"]
            plain = await create_hook(http, server, rx.url)  # secret generated, default events
            assert plain["secret"].startswith("whsec_") and "partial" not in plain["events"]
            everything = await create_hook(http, server, rx.url, secret=SECRET,
                                           events=["call_started", "partial", "final", "usage", "call_ended"])
            async with http.get(base, headers=AUTH) as r:
                listed = (await r.json())["webhooks"]
            assert {w["id"] for w in listed} == {plain["id"], everything["id"]}
            assert all("secret" not in w and w["secret_hint"].startswith("…") for w in listed)
            async with http.get(base, headers=OTHER) as r:
                assert (await r.json())["webhooks"] == []
            for method in ("get", "patch", "delete"):
                async with http.request(method, f"{base}/{plain['id']}", json={"enabled": False}, headers=OTHER) as r:
                    assert r.status == 404, method
            async with http.patch(f"{base}/{plain['id']}", json={"events": ["call_ended"], "description": "ends"},
                                  headers=AUTH) as r:
                upd = await r.json()
                assert r.status == 200 and upd["events"] == ["call_ended"] and "secret" not in upd
            async with http.patch(f"{base}/{plain['id']}", json={}, headers=AUTH) as r:
                assert r.status == 400
            async with http.post(f"{base}/{everything['id']}/test", headers=AUTH) as r:
                ping = await r.json()
            assert r.status == 200 and ping["delivered"] is True and ping["http_status"] == 200
            assert rx.hits[-1].event["type"] == "ping" and rx.hits[-1].verifies(SECRET)
            rx.hits.clear()
            # every sentence: a short one can end before its first partial on a loaded machine (seen:
            # one partial for EN[0] alone), and the opt-in is checked against what the client saw
            mine, seen = await stream_speech(server, EN)
            theirs, _ = await stream_speech(server, EN[1:], key=OTHER_KEY)
            await rx.wait_for(lambda r: len([e for e in r.events(mine) if e["type"] == "call_ended"]) == 2)
            await asyncio.sleep(1.0)  # the other key's job has ended too: nothing of it may arrive
            async with http.delete(f"{base}/{plain['id']}", headers=AUTH) as r:
                assert r.status == 204
            async with http.get(f"{base}/{plain['id']}", headers=AUTH) as r:
                assert r.status == 404
    finally:
        await rx.stop()
    assert rx.events(theirs) == []
    by_hook: dict[str, list[dict]] = {}
    for h in rx.hits:
        by_hook.setdefault(h.headers["X-Webhook-Id"], []).append(h.event)
    assert [e["type"] for e in by_hook[plain["id"]]] == ["call_ended"]
    types = [e["type"] for e in by_hook[everything["id"]]]
    assert "usage" in types and types[0] == "call_started" and types[-1] == "call_ended"
    client_partials = [e["text"] for e in seen if e["type"] == "partial"]
    assert client_partials, "the recognizer sent no partial for two sentences"
    # the opted-in endpoint gets every partial the session's client got (the outbox tap drops none)
    assert [e["text"] for e in by_hook[everything["id"]] if e["type"] == "partial"] == client_partials


async def test_operator_endpoint_from_config_gets_every_key(tmp_path, pool, storage):
    rx = await Receiver().start()
    endpoints = json.dumps([{"name": "crm", "url": rx.url, "secret": SECRET, "events": ["final", "call_ended"]}])
    srv = await start_server(tmp_path / "data", pool, **{"webhooks.endpoints": endpoints, **storage})
    try:
        a, _ = await stream_speech(srv, EN[:1])
        b, _ = await stream_speech(srv, EN[1:], key=OTHER_KEY)
        await rx.wait_for(lambda r: r.ended(a) and r.ended(b))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{srv.url}/v1/webhooks", headers=AUTH) as r:
                assert (await r.json())["webhooks"] == []  # an operator endpoint is not a key's
            async with http.delete(f"{srv.url}/v1/webhooks/wh_cfg_crm", headers=AUTH) as r:
                assert r.status == 404
    finally:
        await rx.stop()
        await srv.stop()
    assert all(h.verifies(SECRET) and h.headers["X-Webhook-Id"] == "wh_cfg_crm" for h in rx.hits)
    assert finals(rx.events(a)) and finals(rx.events(b))


async def test_kill_9_mid_call_then_restart_delivers_saved_finals_and_the_end(tmp_path, pool):
    """The service dies (SIGKILL) mid-call while the receiver is down; after the restart the
    receiver gets every final the client had seen, in order, then the job's failed call_ended."""
    import signal

    from tests.test_service_process import Serve

    data = tmp_path / "data"
    rx = Receiver()
    endpoints = json.dumps([{"name": "crm", "url": rx.url, "secret": SECRET, "events": ["final", "call_ended"]}])
    env = {"CALLBRIDGE_API_KEYS": API_KEY, "CALLBRIDGE_WEBHOOKS_ENDPOINTS": endpoints,
           "CALLBRIDGE_WEBHOOKS_BACKOFF_MAX_S": "2"}
    async with Serve(data, env) as srv:
        live = StreamClient(srv.url, api_key=API_KEY)
        await live.__aenter__()
        pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(1.2), speech(EN[1]), sil(1.2), speech(EN[0][:25])])
        await send_paced(live, pcm.tobytes(), SR * 2, speed=4.0)
        seen: list[dict] = []
        while len(finals(seen)) < 2:
            seen.append(await asyncio.wait_for(live._next(), 30))
        srv.proc.send_signal(signal.SIGKILL)
        await srv.proc.wait()
        await live.aclose()
    await rx.start()
    srv2 = await start_server(data, pool, **{"webhooks.endpoints": endpoints, "webhooks.backoff_max_s": "2"})
    try:
        await rx.wait_for(lambda r: r.ended(live.job_id), timeout=60)
        saved = await srv2.service.store.segments(live.job_id)
    finally:
        await srv2.stop()
        await rx.stop()
    sent = rx.events(live.job_id)
    assert [e["text"] for e in finals(sent)][: len(finals(seen))] == [e["text"] for e in finals(seen)]
    assert [e["text"] for e in finals(sent)] == [g.text for g in saved]  # every saved final, once
    assert sent[-1]["type"] == "call_ended" and sent[-1]["status"] == "failed"
    assert [e["seq"] for e in sent] == sorted(e["seq"] for e in sent)
    assert all(h.verifies(SECRET) for h in rx.hits)


async def test_finals_saved_but_not_queued_before_a_crash_are_recovered(tmp_path, pool, storage):
    """The few milliseconds between a final's save and its outbox row: a job left live in the
    database with finals and no outbox rows (what kill -9 in that window leaves) gets them sent."""
    from bridge.jobs.model import Job, JobSource, JobStatus
    from bridge.stores import DB_NAME, open_stores

    data = tmp_path / "data"
    data.mkdir(parents=True)
    stores = await open_stores(storage.get("storage.url") or f"sqlite://{data / DB_NAME}")
    job = Job(id="job_crashed", owner="someone", status=JobStatus.LIVE, source=JobSource.SIP,
              created_at=time.time(), speakers=["caller", "agent"], duration_s=4.0)
    await stores.jobs.create_job(job)
    texts = ["Hello, thanks for calling.", "I have a question about my bill."]
    for i, t in enumerate(texts):
        await stores.jobs.add_segment(job.id, {"text": t, "channel": i, "speaker": job.speakers[i],
                                               "start": 1.0 + i, "end": 1.8 + i, "speech_final": True, "words": []})
    await stores.close()
    rx = await Receiver().start()
    endpoints = json.dumps([{"name": "crm", "url": rx.url, "secret": SECRET, "events": ["final", "call_ended"],
                             "sources": ["sip"]}])
    srv = await start_server(data, pool, **{"webhooks.endpoints": endpoints, **storage})
    try:
        await rx.wait_for(lambda r: r.ended(job.id))
    finally:
        await srv.stop()
        await rx.stop()
    sent = rx.events(job.id)
    assert [(e["type"], e.get("text"), e.get("speaker")) for e in sent] == [
        ("final", texts[0], "caller"), ("final", texts[1], "agent"), ("call_ended", None, None)]
    assert all(e["recovered"] is True for e in sent) and sent[-1]["status"] == "failed"
    assert sent[-1]["error"]["code"] == "INTERNAL"


async def until(pred, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll `pred()` (sync or async) until it holds; for state the service exposes no event for."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_one_keys_hanging_endpoints_do_not_delay_another_keys(tmp_path, pool):
    """Key A has 20 endpoints that accept the connection and never answer; while A's attempts
    hang (the timeout is longer than the test), key B's endpoint gets each of B's events within
    a second of the same event on B's dashboard socket. Before per-owner caps, A's chains took
    every slot of the pool and B waited for A's timeouts."""
    hanging = [await HangingReceiver().start() for _ in range(20)]
    rx = await Receiver().start()
    srv = await start_server(tmp_path / "data", pool, **{**ALLOW_LOOPBACK, "webhooks.timeout_s": "120"})
    try:
        async with aiohttp.ClientSession() as http:
            for h in hanging:
                await create_hook(http, srv, h.url, secret=SECRET)
            hook_b = await create_hook(http, srv, rx.url, headers=OTHER, secret=SECRET, events=list(ALL_EVENT_TYPES))
            job_a, _ = await stream_speech(srv, EN[:1])
            cfg = srv.service.config.webhooks
            # A's attempts are out and hanging: as many as A may hold
            await until(lambda: sum(h.connections for h in hanging) >= cfg.owner_concurrency, what="A's attempts")
            seen: dict[tuple[str, int], float] = {}
            done = asyncio.Event()
            sub = asyncio.create_task(socket_arrivals(srv.url, OTHER_KEY, seen, done))
            await until(lambda: srv.service.bus._subs.get(None), what="B's socket subscribed")
            job_b, _ = await stream_speech(srv, EN[1:], key=OTHER_KEY)
            await rx.wait_for(lambda r: r.ended(job_b))
            done.set()
            await sub
            async with http.get(f"{srv.url}/v1/webhooks/{hook_b['id']}/deliveries?job_id={job_b}",
                                headers=OTHER) as r:
                log_b = (await r.json())["deliveries"]
        held = sum(h.connections for h in hanging)
        in_flight = srv.service.webhooks.stats()["in_flight"]
    finally:
        await srv.stop()
        await rx.stop()
        for h in hanging:
            await h.stop()
    hooked = {(h.event["job_id"], h.event["seq"]): h.at for h in rx.hits}
    mine = {k: t for k, t in seen.items() if k[0] == job_b}
    assert mine and set(mine) == set(hooked), (sorted(mine), sorted(hooked))
    delays = {k: hooked[k] - t for k, t in mine.items()}
    assert max(delays.values()) < 1.0, sorted(delays.values())
    assert all(d["status"] == "delivered" and d["attempts"] == 1 for d in log_b)
    # A's attempts were hanging the whole time, and held no more than A's share of the pool
    assert held == cfg.owner_concurrency and in_flight == cfg.owner_concurrency, (held, in_flight)


async def test_breaker_opens_after_consecutive_failures_and_lets_one_probe_through(tmp_path, pool):
    """Three failures in a row open the endpoint's breaker: no attempt goes out and no slot is held
    until the cool-down has passed, then exactly one probe although two chains are due; a failed
    probe reopens it, redeliver after the fix probes at once and a success closes it."""
    cooldown = 3.0
    rx = await Receiver().start()
    rx.status = 500
    srv = await start_server(tmp_path / "data", pool, **{**FAST_RETRY, "webhooks.breaker_failures": "3",
                                                         "webhooks.breaker_cooldown_s": str(cooldown)})
    try:
        async with aiohttp.ClientSession() as http:
            hook = await create_hook(http, srv, rx.url, secret=SECRET, events=["final"])
            base = f"{srv.url}/v1/webhooks/{hook['id']}"

            async def circuit() -> dict:
                async with http.get(base, headers=AUTH) as r:
                    return (await r.json())["circuit"]

            def settled(state: str):
                async def check() -> bool:
                    return (await circuit())["state"] == state and srv.service.webhooks.stats()["in_flight"] == 0
                return check

            assert (await circuit()) == {"state": "closed", "consecutive_failures": 0, "retry_at": None}
            jobs = ["job_breaker_a", "job_breaker_b"]
            for job in jobs:  # two chains, so a probe has company it must not bring along
                srv.service.bus.publish(job, Final("hello there", (), 0, "caller", 0.0, 1.0, True),
                                        owner=key_id_for(API_KEY), source="stream")
            await until(settled("open"), what="the breaker to open")
            opened = await circuit()
            n_open = len(rx.requests)
            assert 3 <= n_open <= 4 and opened["consecutive_failures"] == n_open and opened["retry_at"]
            await rx.wait_for(lambda r: len(r.requests) > n_open, timeout=30)  # the probe
            # nothing went out during the cool-down, although both chains' backoffs (<= 2 s) ran out
            assert rx.requests[n_open].at - rx.requests[2].at >= cooldown - 0.01
            await until(settled("open"), what="the failed probe to reopen the breaker")
            assert len(rx.requests) == n_open + 1  # one probe, not one per due chain
            assert (await circuit())["consecutive_failures"] == n_open + 1
            rx.status = 200
            async with http.post(f"{base}/redeliver", headers=AUTH) as r:
                assert r.status == 202
            await rx.wait_for(lambda r: {e["job_id"] for e in r.events()} == set(jobs), timeout=30)
            assert (await circuit()) == {"state": "closed", "consecutive_failures": 0, "retry_at": None}
    finally:
        await srv.stop()
        await rx.stop()
    assert [e["text"] for e in rx.events()] == ["hello there", "hello there"]


async def test_disabled_endpoint_gets_no_events_queued_until_enabled(server):
    rx = await Receiver().start()
    try:
        async with aiohttp.ClientSession() as http:
            events = ["call_started", "call_ended"]
            on = await create_hook(http, server, rx.url, secret=SECRET, events=events)
            off = await create_hook(http, server, rx.url, secret=SECRET, events=events, enabled=False)
            assert off["enabled"] is False
            first, _ = await stream_speech(server, EN[:1])
            await rx.wait_for(lambda r: r.ended(first))  # `on` got the end: the outbox has the job's rows
            async with http.get(f"{server.url}/v1/webhooks/{off['id']}/deliveries", headers=AUTH) as r:
                assert (await r.json())["deliveries"] == []  # nothing queued for the disabled one
            async with http.patch(f"{server.url}/v1/webhooks/{off['id']}", json={"enabled": True},
                                  headers=AUTH) as r:
                assert r.status == 200 and (await r.json())["enabled"] is True
            second, _ = await stream_speech(server, EN[1:])
            await rx.wait_for(lambda r: sum(h.event.get("job_id") == second and h.event["type"] == "call_ended"
                                            for h in r.hits) == 2)
    finally:
        await rx.stop()
    by_hook: dict[str, list[tuple[str, str]]] = {}
    for h in rx.hits:
        by_hook.setdefault(h.headers["X-Webhook-Id"], []).append((h.event["job_id"], h.event["type"]))
    assert by_hook[on["id"]] == [(first, "call_started"), (first, "call_ended"),
                                 (second, "call_started"), (second, "call_ended")]
    assert by_hook[off["id"]] == [(second, "call_started"), (second, "call_ended")]


async def test_delivery_off_queues_events_and_the_api_says_so(tmp_path, pool, storage):
    """webhooks.enabled = false: the API works, says delivery is off, events are queued and none
    is sent; the next start with delivery on sends them all."""
    data = tmp_path / "data"
    rx = await Receiver().start()  # up the whole time: anything sent would arrive
    srv = await start_server(data, pool, **{**ALLOW_LOOPBACK, "webhooks.enabled": "false", **storage})
    try:
        async with aiohttp.ClientSession() as http:
            hook = await create_hook(http, srv, rx.url, secret=SECRET, events=["final", "call_ended"])
            async with http.get(f"{srv.url}/v1/webhooks", headers=AUTH) as r:
                listed = await r.json()
            assert listed["delivering"] is False and [w["id"] for w in listed["webhooks"]] == [hook["id"]]
            async with http.post(f"{srv.url}/v1/webhooks/{hook['id']}/test", headers=AUTH) as r:
                ping = await r.json()
            assert r.status == 200 and ping["delivered"] is False and "webhooks.enabled = false" in ping["error"]
            job_id, got = await stream_speech(srv, EN[:1])
            await srv.service.webhooks.flush()
            async with http.get(f"{srv.url}/v1/webhooks/{hook['id']}/deliveries", headers=AUTH) as r:
                queued = (await r.json())["deliveries"]
    finally:
        await srv.stop()
    assert [d["type"] for d in reversed(queued)] == ["final"] * len(finals(got)) + ["call_ended"]
    assert all(d["status"] == "pending" and d["attempts"] == 0 for d in queued)
    assert rx.requests == []
    srv = await start_server(data, pool, **ALLOW_LOOPBACK, **storage)
    try:
        await rx.wait_for(lambda r: r.ended(job_id))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{srv.url}/v1/webhooks", headers=AUTH) as r:
                assert (await r.json())["delivering"] is True
    finally:
        await srv.stop()
        await rx.stop()
    assert [shape(e) for e in finals(rx.events(job_id))] == [shape(e) for e in finals(got)]
