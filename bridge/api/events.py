"""Live events for dashboards (docs/stream-protocol.md, "Live events for dashboards"; docs/events.md).

`GET /v1/calls/{job_id}/events` follows one job: first its finals so far (read from the store,
where every final is saved before it is published), then the job's live events. `GET /v1/events`
follows every live job of the caller's owner, optionally filtered by `source` and `types`.
Both are WebSockets of JSON text frames, each an event dict with `job_id` (and `seq` when known).

Catch-up without gaps or doubles: the handler subscribes to the bus BEFORE it reads the store, so
a final is either in the store read, in the subscription, or both; live finals already sent from
the store are dropped (same channel, start, end and text). With a shared bus (RedisBus) the live
events of a job on another node arrive later than its finals reach the store, so the subscription
may also hold events published before the last final the store read: by seq, a live event not
above the highest seq already sent (catch-up finals whose seq is known, or earlier live events)
was sent already or is superseded, and is dropped; `call_ended` always goes out (a job failed by
another node after its owner died is numbered by that node). A catch-up final whose seq is not
known here (saved but not yet published when the store was read, or published while this node
could not read the bus) still supersedes the live partials of its utterance: a partial starts
where its utterance starts, at or before its final's first word, and a later utterance (or the
next piece of one cut at the length cap) starts after it, so a live partial that starts no later
than the latest catch-up final on its channel is dropped.

A slow subscriber never slows recognition: its subscription is bounded (`SUBSCRIBER_QUEUE`);
partials are dropped first, and when even a final does not fit, the socket gets an `error`
frame (SUBSCRIBER_TOO_SLOW) and is closed with 4008. Details: docs/events.md.
"""

from __future__ import annotations

import asyncio
import weakref
import json
import socket
from collections import OrderedDict
from typing import Any

from aiohttp import WSMsgType, web

from bridge.api.http import SERVICE, bad_request, json_error, release_heartbeat, require_principal, service_of
from bridge.calls import ended_event
from bridge.events.bus import Envelope, EventBus, Subscription
from bridge.events.types import EventType
from bridge.jobs.model import JobSource, JobStatus
from bridge.logs import get_logger

__all__ = ["CLOSE_TOO_SLOW", "SEND_BUFFER_BYTES", "SUBSCRIBER_QUEUE", "add_routes"]

log = get_logger("bridge.api.events")

JOB_PATH = "/v1/calls/{job_id}/events"
ALL_PATH = "/v1/events"
SUBSCRIBER_QUEUE = 1000  # events a subscriber may be behind before it is cut off
SEND_BUFFER_BYTES: int | None = None  # shrink a subscriber socket's send buffers (tests); None = OS default
CLOSE_TIMEOUT_S = 5.0  # bound on sending the last frames to a subscriber that does not read
CLOSE_NORMAL = 1000
CLOSE_TOO_SLOW = 4008
LIVE_TYPES = {EventType.CALL_STARTED, EventType.PARTIAL, EventType.FINAL, EventType.USAGE, EventType.CALL_ENDED}
_SEQ_INDEX_JOBS = 256  # finished jobs whose final seqs are still remembered



def _key(d: dict[str, Any]) -> tuple[int, float, float, str]:
    return (int(d.get("channel", 0)), round(float(d["start"]), 3), round(float(d["end"]), 3), str(d.get("text", "")))


class _SeqIndex:
    """A bus tap remembering the bus `seq` of each published final, per job (in memory), so
    finals read back from the store can carry their seq and honour `?after=`."""

    def __init__(self) -> None:
        self.jobs: OrderedDict[str, dict[tuple, int]] = OrderedDict()

    def __call__(self, env: Envelope) -> None:
        ev = env.event
        if ev.type is EventType.FINAL:
            self.jobs.setdefault(env.job_id, {})[_key(ev.to_dict())] = env.seq
            self.jobs.move_to_end(env.job_id)
            while len(self.jobs) > _SEQ_INDEX_JOBS:
                self.jobs.popitem(last=False)


_SEQ_INDEXES: "weakref.WeakKeyDictionary[EventBus, _SeqIndex]" = weakref.WeakKeyDictionary()


def _seq_index(bus: EventBus) -> _SeqIndex:
    idx = _SEQ_INDEXES.get(bus)
    if idx is None:
        idx = _SEQ_INDEXES[bus] = _SeqIndex()
        bus.add_tap(idx, remote=True)  # seqs of other nodes' finals too: any node serves any job
    return idx



async def _prepare(request: web.Request) -> web.WebSocketResponse | web.Response:
    limit = SEND_BUFFER_BYTES
    ws = web.WebSocketResponse(heartbeat=30.0, **({"writer_limit": limit} if limit else {}))
    if not ws.can_prepare(request).ok:
        return json_error(426, "UPGRADE_REQUIRED", f"{request.path} is a WebSocket: connect with a WebSocket client")
    await ws.prepare(request)
    if limit and request.transport is not None:
        request.transport.set_write_buffer_limits(high=limit)
        sock = request.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limit)
    return ws


class _Feed:
    """One subscriber socket: writes frames, watches its subscription for overflow and the client
    for a close, and ends the socket with 1000 or 4008."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, sub: Subscription) -> None:
        self.request = request
        self.ws = ws
        self.sub = sub

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(obj))

    async def run(self, body: Any) -> None:
        """Run `body()` (it sends frames) until it returns, the client leaves, or the sub overflows."""
        tasks = {asyncio.ensure_future(body()), asyncio.ensure_future(self._read()),
                 asyncio.ensure_future(self._watch())}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.sub.close()
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.sub.overflowed:
            behind = self.sub._q.qsize() + self.sub.dropped_partials
            reason = f"subscriber too slow: {behind} events behind"
            log.warning("subscriber_too_slow", path=self.request.path, behind=behind)
            await self._finish(CLOSE_TOO_SLOW, reason, {"type": "error", "code": "SUBSCRIBER_TOO_SLOW",
                                                         "message": reason})
            return
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                log.error("subscriber_failed", path=self.request.path, error=repr(t.exception()))
        await self._finish(CLOSE_NORMAL, "")

    async def _finish(self, code: int, reason: str, last: dict[str, Any] | None = None) -> None:
        if self.ws.closed:
            return

        async def go() -> None:
            if last is not None:
                await self.send(last)
            await self.ws.close(code=code, message=reason.encode()[:120])

        try:
            await asyncio.wait_for(go(), CLOSE_TIMEOUT_S)
        except (TimeoutError, ConnectionError, RuntimeError):
            if self.request.transport is not None:
                self.request.transport.abort()

    async def _read(self) -> None:
        """Clients send nothing we need; return when they close."""
        async for msg in self.ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return

    async def _watch(self) -> None:
        """The sender may be blocked writing to a client that does not read: notice an overflow anyway."""
        while not self.sub.overflowed:
            await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- one job


async def job_events(request: web.Request) -> web.StreamResponse:
    svc = service_of(request)
    principal = await require_principal(request)  # temporary tokens: refused, not spent
    job_id = request.match_info["job_id"]
    after_raw = request.query.get("after")
    try:
        after = int(after_raw) if after_raw not in (None, "") else None
    except ValueError:
        raise bad_request(f"after={after_raw!r} is not an integer seq") from None
    job = await svc.store.get_job(job_id, principal.owner)
    if job is None:
        return json_error(404, "NOT_FOUND", f"job {job_id!r} not found")
    index = _seq_index(svc.bus)
    ws = await _prepare(request)
    if not isinstance(ws, web.WebSocketResponse):
        return ws
    sub = svc.bus.subscribe(job_id, maxsize=SUBSCRIBER_QUEUE)  # before the store read: nothing is missed
    feed = _Feed(request, ws, sub)

    async def body() -> None:
        job_now = await svc.store.get_job(job_id)
        segs = await svc.store.segments(job_id)
        seqs = index.jobs.get(job_id, {})
        sent: set[tuple] = set()
        last = after or 0  # the highest seq the client has: live events up to it are not sent
        began: dict[int, float] = {}  # per channel, the start of the latest final sent from the store
        for g in segs:
            d = g.final_event()
            k = _key(d)
            sent.add(k)
            began[k[0]] = max(began.get(k[0], -1.0), k[1])
            seq = seqs.get(k)
            if seq is not None:
                last = max(last, seq)
            if after is not None and seq is not None and seq <= after:
                continue
            d["job_id"] = job_id
            if seq is not None:
                d["seq"] = seq
            await feed.send(d)
        if job_now is None or job_now.status is not JobStatus.LIVE:
            if job_now is not None:
                ended = ended_event(job_now, svc.config.credits.per_minute)
                await feed.send({**ended.to_dict(), "job_id": job_id})
            return
        async for env in sub:
            if sub.overflowed:
                return
            ev = env.event
            ended = ev.type is EventType.CALL_ENDED
            if ev.type not in LIVE_TYPES or (env.seq <= last and not ended):
                continue  # sent already (from the store or live), superseded, or before ?after=
            d = env.to_dict()
            if ev.type is EventType.PARTIAL and round(ev.start, 3) <= began.get(ev.channel, -1.0):
                continue  # of an utterance the store's finals already hold (their seq unknown here)
            if ev.type is EventType.FINAL:
                k = _key(d)
                if k in sent:
                    sent.discard(k)  # published after our store read: already sent
                    last = max(last, env.seq)  # and what was published before it is superseded
                    continue
            await feed.send(d)
            last = max(last, env.seq)
            if ended:
                return

    try:
        await feed.run(body)
    finally:
        release_heartbeat(ws)
    return ws


# --------------------------------------------------------------------------- all jobs of an owner


def _choices(request: web.Request, name: str, phrase: str, allowed: list[str]) -> set[str] | None:
    """`?name=a,b` as a set of allowed values; None when absent; 400 naming what is not allowed."""
    raw = request.query.get(name)
    if not raw:
        return None
    values = {v.strip() for v in raw.split(",") if v.strip()}
    bad = values - set(allowed)
    if bad:
        raise bad_request(f"{name} {phrase} {', '.join(allowed)}; got {sorted(bad)}")
    return values


async def all_events(request: web.Request) -> web.StreamResponse:
    svc = service_of(request)
    principal = await require_principal(request)  # temporary tokens: refused, not spent
    sources = _choices(request, "source", "must be one of", [s.value for s in JobSource])
    types = _choices(request, "types", "must be among", sorted(t.value for t in LIVE_TYPES))
    ws = await _prepare(request)
    if not isinstance(ws, web.WebSocketResponse):
        return ws
    sub = svc.bus.subscribe(None, maxsize=SUBSCRIBER_QUEUE)
    feed = _Feed(request, ws, sub)

    async def body() -> None:
        async for env in sub:
            if sub.overflowed:
                return
            ev = env.event
            if ev.type not in LIVE_TYPES or (types is not None and ev.type.value not in types):
                continue
            if env.owner != principal.owner or (sources is not None and env.source not in sources):
                continue
            await feed.send(env.to_dict())

    try:
        await feed.run(body)
    finally:
        release_heartbeat(ws)
    return ws


def add_routes(app: web.Application) -> None:
    _seq_index(app[SERVICE].bus)  # from the start, so every final's seq is known
    app.router.add_get(JOB_PATH, job_events)
    app.router.add_get(ALL_PATH, all_events)
