"""Dashboard sockets end to end: real server on loopback, real model, real streams (docs/events.md).

The single-node tests run on the in-process bus and on the Redis bus (a real redis-server); the
cross-node ones run two services in this process on one PostgreSQL database and one Redis: a
dashboard on node B follows a call on node A."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct

import aiohttp
import numpy as np
import pytest

from bench import corpus
from bridge.api import events as events_api
from bridge.client.stream import StreamClient
from bridge.events.types import Final, Partial
from tests.serving import API_KEY, OTHER_KEY, RunningServer, start_server
from tests.test_stream_api import EN, SR, send_paced, sil, speech, text_of

AUTH = {"Authorization": f"Bearer {API_KEY}"}
WAIT = 60.0  # bound on any one wait for a frame


@pytest.fixture(params=["memory+sqlite", "redis+postgresql"])
async def server(request, tmp_path, pool):
    """The real service as one box runs it (in-process bus, SQLite), then as a cluster node does
    (a Redis bus and PostgreSQL: one node, whose events make the round trip through Redis to no
    one and must reach its own subscribers once, and whose catch-up reads PostgreSQL)."""
    ov = {}
    if request.param == "redis+postgresql":
        ov = {"bus.url": request.getfixturevalue("redis_server").url,
              "storage.url": request.getfixturevalue("pg_server").new_database()}
    srv = await start_server(tmp_path / "data", pool, **ov)
    yield srv
    await srv.stop()


@pytest.fixture
async def two_nodes(tmp_path, pool, pg_server, redis_server):
    """Nodes A and B: two services on one PostgreSQL database and one Redis, each its own data dir.
    Both start before any call (a starting node fails the live jobs it finds: one node per
    database until node ownership of jobs lands)."""
    db = pg_server.new_database()
    nodes: list[RunningServer] = []
    try:
        for name in ("a", "b"):
            nodes.append(await start_server(tmp_path / f"data_{name}", pool, **{"storage.url": db,
                                                                                  "bus.url": redis_server.url}))
        yield nodes[0], nodes[1]
    finally:
        for n in nodes:
            await n.stop()


def ws_base(server) -> str:
    return f"ws://127.0.0.1:{server.port}"


async def read_until_ended(ws: aiohttp.ClientWebSocketResponse, job_id: str | None = None) -> list[dict]:
    """Frames until `call_ended` (of `job_id` if given) or the close; each bounded by WAIT."""
    out: list[dict] = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), WAIT)
        if msg.type != aiohttp.WSMsgType.TEXT:
            return out
        ev = json.loads(msg.data)
        out.append(ev)
        if ev["type"] == "call_ended" and (job_id is None or ev["job_id"] == job_id):
            return out


async def next_final(it) -> list[dict]:
    """Stream-client events up to and including the next final."""
    got = []
    while True:
        ev = await asyncio.wait_for(it.__anext__(), WAIT)
        got.append(ev)
        if ev["type"] == "final" and ev["text"]:
            return got


def finals(evs: list[dict]) -> list[dict]:
    return [e for e in evs if e["type"] == "final"]


async def test_mid_call_subscriber_gets_earlier_finals_then_live(server):
    async with aiohttp.ClientSession() as http:
        async with StreamClient(server.url, api_key=API_KEY) as s:
            it = s.__aiter__()
            await send_paced(s, np.concatenate([sil(0.3), speech(EN[0]), sil(1.2)]).tobytes(), SR * 2)
            before = await next_final(it)  # the first final is saved and sent: now a dashboard joins
            async with http.ws_connect(f"{ws_base(server)}/v1/calls/{s.job_id}/events", headers=AUTH) as dash:
                first = json.loads((await asyncio.wait_for(dash.receive(), WAIT)).data)
                reader = asyncio.ensure_future(read_until_ended(dash, s.job_id))
                await send_paced(s, np.concatenate([speech(EN[1]), sil(1.2)]).tobytes(), SR * 2)
                await s.end()
                after = [ev async for ev in it]
                seen = [first] + await asyncio.wait_for(reader, WAIT)
                close = await asyncio.wait_for(dash.receive(), WAIT)
        assert close.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and dash.close_code == 1000
    stream_finals = finals(before + after)
    assert len(stream_finals) >= 2 and corpus.wer(" ".join(EN), text_of(stream_finals)) < 0.2
    # the earlier final first (from the store), then the live ones, in order, each exactly once
    assert first["type"] == "final" and first["text"] == stream_finals[0]["text"]
    assert [e["text"] for e in finals(seen)] == [e["text"] for e in stream_finals]
    assert [(e["start"], e["end"]) for e in finals(seen)] == [(e["start"], e["end"]) for e in stream_finals]
    assert all(e["job_id"] == s.job_id for e in seen)
    assert "call_started" not in [e["type"] for e in seen]  # it happened before the dashboard joined
    assert seen[-1]["type"] == "call_ended" and seen[-1]["status"] == "completed"
    live = [e for e in seen[1:] if e["type"] != "call_ended"]
    assert live and all("seq" in e for e in live)
    assert [e["seq"] for e in live] == sorted(e["seq"] for e in live)
    assert first.get("seq", 0) < min(e["seq"] for e in finals(seen)[1:])


async def test_owner_wide_socket_sees_own_jobs_only(server):
    async def talk(key: str, text: str) -> str:
        async with StreamClient(server.url, api_key=key) as s:
            await send_paced(s, np.concatenate([sil(0.3), speech(text), sil(1.2)]).tobytes(), SR * 2)
            await s.end()
            async for _ in s:
                pass
        return s.job_id

    base = f"{ws_base(server)}/v1/events"
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(base, headers=AUTH) as dash, \
            http.ws_connect(f"{base}?types=final,call_ended&source=stream", headers=AUTH) as finals_only, \
            http.ws_connect(f"{base}?source=sip", headers=AUTH) as sip_only:
        mine, theirs = await asyncio.gather(talk(API_KEY, EN[0]), talk(OTHER_KEY, EN[1]))
        seen = await read_until_ended(dash, mine)
        filtered = await read_until_ended(finals_only, mine)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(sip_only.receive(), 0.5)
    assert theirs != mine
    assert {e["job_id"] for e in seen} == {mine}
    kinds = [e["type"] for e in seen]
    assert kinds[0] == "call_started" and kinds[-1] == "call_ended" and "final" in kinds and "usage" in kinds
    assert seen[0]["source"] == "stream"
    assert corpus.wer(EN[0], text_of(finals(seen))) < 0.2
    assert {e["type"] for e in filtered} == {"final", "call_ended"}
    assert {e["job_id"] for e in filtered} == {mine}


async def test_auth_and_ownership_refused_before_upgrade(server):
    async with aiohttp.ClientSession() as http:
        async with StreamClient(server.url, api_key=OTHER_KEY) as s:
            await s.send_audio(sil(0.2))
        theirs = s.job_id
        for path in ("/v1/events", f"/v1/calls/{theirs}/events"):
            async with http.get(server.url + path) as r:
                assert r.status == 401 and (await r.json())["error"]["code"]
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(ws_base(server) + path, headers={"Authorization": "Bearer cbk_nope"})
            assert e.value.status == 401
        for job in (theirs, "job_unknown"):
            async with http.get(f"{server.url}/v1/calls/{job}/events", headers=AUTH) as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(f"{ws_base(server)}/v1/calls/{job}/events", headers=AUTH)
            assert e.value.status == 404
        async with http.get(f"{server.url}/v1/events?types=nope", headers=AUTH) as r:
            assert r.status == 400
        # the owner itself may follow it (a query api_key works too)
        async with http.ws_connect(f"{ws_base(server)}/v1/calls/{theirs}/events?api_key={OTHER_KEY}") as ws:
            evs = await read_until_ended(ws)
        assert evs[-1]["type"] == "call_ended"


async def test_finished_job_sends_finals_then_call_ended(server):
    async with StreamClient(server.url, api_key=API_KEY) as s:
        await send_paced(s, np.concatenate([sil(0.3), speech(EN[0]), sil(1.0), speech(EN[1]), sil(1.2)]).tobytes(),
                         SR * 2)
        await s.end()
        streamed = [ev async for ev in s]
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{ws_base(server)}/v1/calls/{s.job_id}/events", headers=AUTH) as ws:
            evs = await read_until_ended(ws)
            close = await asyncio.wait_for(ws.receive(), WAIT)
            assert close.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and ws.close_code == 1000
            # ?after= skips what a reconnecting dashboard already has (seqs known while the server runs)
        first_seq = evs[0]["seq"]
        async with http.ws_connect(f"{ws_base(server)}/v1/calls/{s.job_id}/events?after={first_seq}",
                                   headers=AUTH) as ws:
            later = await read_until_ended(ws)
    assert [e["type"] for e in evs] == ["final"] * (len(evs) - 1) + ["call_ended"]
    assert [e["text"] for e in evs[:-1]] == [e["text"] for e in finals(streamed)]
    assert all(e["job_id"] == s.job_id for e in evs)
    ended = evs[-1]
    assert ended["status"] == "completed"
    assert ended["streamed_seconds"] == s.completed["streamed_seconds"]
    assert ended["credits_used"] == s.completed["credits_used"]
    assert [e["text"] for e in later[:-1]] == [e["text"] for e in evs[1:-1]]


# --------------------------------------------------------------------------- slow subscriber


class RawSubscriber:
    """A WebSocket client that can stop reading: tiny receive buffer, frames parsed by hand."""

    def __init__(self, port: int, path: str) -> None:
        self.port, self.path = port, path
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        self.sock.setblocking(False)
        self.buf = b""

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(self.sock, ("127.0.0.1", self.port)), 10)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               f"Authorization: Bearer {API_KEY}\r\n\r\n")
        await loop.sock_sendall(self.sock, req.encode())
        while b"\r\n\r\n" not in self.buf:
            await self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    async def _fill(self) -> None:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65536), WAIT)
        if not data:
            raise ConnectionError("closed")
        self.buf += data

    async def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    async def frame(self) -> tuple[int, bytes]:
        b0, b1 = await self._take(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self._take(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self._take(8))
        return b0 & 0x0F, await self._take(n)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("where", ["same node", "other node"])
async def test_slow_subscriber_is_cut_off_and_stream_unaffected(tmp_path, pool, monkeypatch, request, where):
    """On the call's node (in-process bus), and on another node reading the call off Redis: the
    same cut-off, and the call does not notice either."""
    monkeypatch.setattr(events_api, "SUBSCRIBER_QUEUE", 8)
    monkeypatch.setattr(events_api, "SEND_BUFFER_BYTES", 4096)
    # a socket send that blocks would hold the publisher for an hour: the stream can only complete
    # inside the hang guard below if nothing waits on the slow subscriber
    monkeypatch.setattr(events_api, "CLOSE_TIMEOUT_S", 3600.0)
    ov = {"credits.usage_interval_s": "0.01"}
    if where == "other node":
        ov.update({"storage.url": request.getfixturevalue("pg_server").new_database(),
                   "bus.url": request.getfixturevalue("redis_server").url})
    srv = await start_server(tmp_path / "data", pool, **ov)
    watcher = await start_server(tmp_path / "data_b", pool, **ov) if where == "other node" else srv
    slow = RawSubscriber(watcher.port, "/v1/events")
    try:
        await slow.connect()  # ... and then never reads while the call runs
        pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(1.2), speech(EN[1]), sil(1.2)])
        async with asyncio.timeout(600):  # a hang guard, not a speed bound (CLOSE_TIMEOUT_S above)
            async with StreamClient(srv.url, api_key=API_KEY) as s:
                await send_paced(s, pcm.tobytes(), SR * 2, speed=2.0)
                await s.end()
                streamed = [ev async for ev in s]
        # the stream completed normally, with its finals
        assert s.completed is not None and s.close_code == 1000
        assert corpus.wer(" ".join(EN), text_of(finals(streamed))) < 0.2
        # now read what the slow subscriber was sent: events, then `error`, then close 4008
        frames = []
        while True:
            op, payload = await slow.frame()
            if op == 0x8:
                code = struct.unpack("!H", payload[:2])[0]
                reason = payload[2:].decode()
                break
            frames.append(json.loads(payload))
        assert code == 4008 and reason.startswith("subscriber too slow:") and "events behind" in reason
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "SUBSCRIBER_TOO_SLOW"
        assert "call_ended" not in [f["type"] for f in frames]  # cut off while the call was running
        assert {f["job_id"] for f in frames[:-1]} == {s.job_id}
    finally:
        slow.close()
        if watcher is not srv:
            await watcher.stop()
        await srv.stop()


# --------------------------------------------------------------------------- across nodes


async def test_dashboard_on_another_node_catches_up_then_follows_live(two_nodes):
    """The call runs on A; B reads its earlier finals from the shared store, then its live events
    from Redis: each final once, in seq order, then call_ended, and /v1/events on B saw it all."""
    a, b = two_nodes
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(f"{ws_base(b)}/v1/events", headers=AUTH) as everything_on_b:
        async with StreamClient(a.url, api_key=API_KEY) as s:
            it = s.__aiter__()
            await send_paced(s, np.concatenate([sil(0.3), speech(EN[0]), sil(1.2)]).tobytes(), SR * 2)
            before = await next_final(it)
            async with http.ws_connect(f"{ws_base(b)}/v1/calls/{s.job_id}/events", headers=AUTH) as dash:
                first = json.loads((await asyncio.wait_for(dash.receive(), WAIT)).data)
                reader = asyncio.ensure_future(read_until_ended(dash, s.job_id))
                await send_paced(s, np.concatenate([speech(EN[1]), sil(1.2)]).tobytes(), SR * 2)
                await s.end()
                after = [ev async for ev in it]
                seen = [first] + await asyncio.wait_for(reader, WAIT)
                close = await asyncio.wait_for(dash.receive(), WAIT)
            assert close.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and dash.close_code == 1000
        live_on_b = await read_until_ended(everything_on_b, s.job_id)
    stream_finals = finals(before + after)
    assert len(stream_finals) >= 2 and corpus.wer(" ".join(EN), text_of(stream_finals)) < 0.2
    # per-job socket on B: the store's final first, then the live ones, each exactly once, in order
    assert first["type"] == "final" and first["text"] == stream_finals[0]["text"]
    assert [(e["text"], e["start"], e["end"]) for e in finals(seen)] == \
        [(e["text"], e["start"], e["end"]) for e in stream_finals]
    assert seen[-1]["type"] == "call_ended" and seen[-1]["status"] == "completed"
    seqs = [e.get("seq") for e in seen]
    assert None not in seqs and seqs == sorted(set(seqs))  # B learned A's seqs (the store's final's too)
    # owner-wide socket on B: A's whole call, live, in publish order
    kinds = [e["type"] for e in live_on_b]
    assert kinds[0] == "call_started" and kinds[-1] == "call_ended" and "usage" in kinds
    assert {e["job_id"] for e in live_on_b} == {s.job_id}
    assert [e["seq"] for e in live_on_b] == sorted({e["seq"] for e in live_on_b})
    assert [e["text"] for e in finals(live_on_b)] == [e["text"] for e in stream_finals]
    assert a.service.bus.health().connected and b.service.bus.received >= len(live_on_b)


async def test_finished_call_of_another_node_reads_from_the_shared_store(two_nodes):
    a, b = two_nodes
    async with StreamClient(a.url, api_key=API_KEY) as s:
        await send_paced(s, np.concatenate([sil(0.3), speech(EN[0]), sil(1.2)]).tobytes(), SR * 2)
        await s.end()
        streamed = [ev async for ev in s]
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{ws_base(b)}/v1/calls/{s.job_id}/events", headers=AUTH) as ws:
            evs = await read_until_ended(ws)
    assert [e["text"] for e in evs[:-1]] == [e["text"] for e in finals(streamed)] and finals(streamed)
    assert evs[-1]["type"] == "call_ended" and evs[-1]["status"] == "completed"
    assert evs[-1]["credits_used"] == s.completed["credits_used"]


@pytest.mark.parametrize("published", [True, False], ids=["final published", "final saved, not yet published"])
async def test_live_events_published_before_the_store_read_are_not_sent_after_its_finals(server, monkeypatch,
                                                                                         published):
    """The race the join must win: between the socket's subscribe and its store read, the call
    publishes a partial and then saves the final that supersedes it, and publishes that final
    before the store read returns (its seq is known) or after (it is not). The final goes out
    once, from the store; the partial it supersedes is not sent after it (seqs only go up)."""
    svc = server.service
    async with StreamClient(server.url, api_key=API_KEY) as s:
        await s.send_audio(sil(0.2))
        job = await svc.store.get_job(s.job_id)
        real_segments = svc.store.segments
        raced = asyncio.Event()

        async def segments_after_the_race(job_id: str):
            if job_id == s.job_id and not raced.is_set():  # the socket has subscribed, not yet read
                raced.set()
                final = Final("one two three", (), 0, "caller", 0.5, 1.5, True)
                svc.bus.publish(job.id, Partial("one two", 0, "caller", 0.5, 1.2), owner=job.owner, source="stream")
                await svc.store.add_segment(job.id, final.to_dict())  # saved before published, as a Call does
                if published:
                    svc.bus.publish(job.id, final, owner=job.owner, source="stream")
                    return await real_segments(job_id)
                segs = await real_segments(job_id)
                # published once the socket's handler next waits: after it read the store and the seqs
                asyncio.get_running_loop().call_soon(
                    lambda: svc.bus.publish(job.id, final, owner=job.owner, source="stream"))
                return segs
            return await real_segments(job_id)

        monkeypatch.setattr(svc.store, "segments", segments_after_the_race)
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(f"{ws_base(server)}/v1/calls/{s.job_id}/events", headers=AUTH) as dash:
            first = json.loads((await asyncio.wait_for(dash.receive(), WAIT)).data)
            await s.end()
            rest = await read_until_ended(dash, s.job_id)
    assert raced.is_set() and first["type"] == "final" and first["text"] == "one two three"
    assert ("seq" in first) is published  # a seq is known once the final was published
    seen = [first] + rest
    assert [e["type"] for e in seen if e["type"] in ("partial", "final")] == ["final"]  # once, no stale partial
    assert [e["seq"] for e in seen if "seq" in e] == sorted(e["seq"] for e in seen if "seq" in e)
    assert seen[-1]["type"] == "call_ended"
