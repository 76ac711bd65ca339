"""The bus for several nodes: every node's events on one Redis stream, read back by every node.

A RedisBus is the in-process bus (local numbering, taps and subscribers, unchanged) with a link to
Redis on each side:

- publish (synchronous, as for every bus): fan out locally at once, then append the envelope to
  a bounded buffer; a writer task sends the buffer to the stream with XADD, in order, in batches.
  While Redis cannot be reached the buffer keeps filling; at `max_buffer` its partials are
  dropped first (they are superseded), then the oldest envelopes, each counted. On reconnection
  the buffer is sent in order, so other nodes see the outage's events late but in order.
- a reader task follows the stream with XREAD from the last entry id it has read, so a node that
  lost its connection resumes where it stopped (what Pub/Sub cannot: it drops messages sent while
  a subscriber is away). Envelopes this node published are skipped (they were delivered locally
  at publish); the others go to the remote taps and to every subscriber not marked `local`.
  An envelope whose (node, job, seq) is not above the last one seen is a resend (a batch retried
  after a connection broke mid-way) and is skipped.

One stream for every job keeps a job's events in publish order (one writer per node, one node per
job) and needs one blocking read per node; it is capped at `STREAM_MAXLEN` entries (approximate
trim), far more than a reader falls behind while connected. docs/events.md has the reasoning.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.exceptions import RedisError

from bridge.logs import get_logger

from .bus import BusHealth, Envelope, InProcessBus
from .types import EventType
from .wire import decode_envelope, encode_envelope

__all__ = ["BusUnavailable", "RedisBus", "SCHEMES", "STREAM", "STREAM_MAXLEN"]

log = get_logger("bridge.events.redisbus")

SCHEMES = ("redis", "rediss")
STREAM = "callbridge:events"
STREAM_MAXLEN = 200_000  # entries kept on the stream (approximate trim at each XADD)
BATCH = 256  # envelopes per XADD pipeline
READ_COUNT = 1024  # entries per XREAD
READ_BLOCK_MS = 1000  # an XREAD waits this long for new entries, then asks again
CONNECT_TIMEOUT_S = 3.0
SOCKET_TIMEOUT_S = 10.0  # > READ_BLOCK_MS: a blocking read is not a timeout
CLOSE_FLUSH_S = 5.0  # on close, how long the buffer gets to reach Redis
REMOTE_JOBS = 65536  # (node, job) pairs whose last seq is remembered against resends
_DOWN = (RedisError, OSError)


class BusUnavailable(RuntimeError):
    """The shared bus cannot be reached at start: the node refuses to run without it (its
    dashboards would silently show only its own calls)."""


class RedisBus(InProcessBus):
    """EventBus on a Redis stream (redis:// or rediss:// URL); see the module docstring."""

    def __init__(self, url: str, *, node_id: str = "", max_buffer: int = 100_000,
                 backoff_base_s: float = 0.05, backoff_cap_s: float = 2.0) -> None:
        super().__init__(node_id=node_id)
        self.url = url
        self.max_buffer = max(1, max_buffer)
        self._redis: Any = aioredis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                                    socket_timeout=SOCKET_TIMEOUT_S,
                                                    # one immediate retry: a pooled connection that a
                                                    # Redis restart left stale fails once; then our loops
                                                    retry=Retry(NoBackoff(), 1))
        self._backoff = EqualJitterBackoff(cap=backoff_cap_s, base=backoff_base_s)
        self._buffer: deque[Envelope] = deque()
        self._inflight: list[Envelope] = []  # the batch being sent: first in line, kept on failure
        self._partials_buffered = False  # whether _buffer may hold partials (skips a useless scan)
        self._wake = asyncio.Event()
        self._last_id = "0-0"
        self._remote_seq: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._tasks: list[asyncio.Task] = []
        self.writer_ok = False
        self.reader_ok = False
        self.sent = 0  # envelopes written to the stream
        self.received = 0  # remote envelopes delivered here
        self.dropped = 0  # envelopes given up because the buffer was full (partials included)
        self.dropped_partials = 0
        self.resends_skipped = 0
        self.unreadable = 0
        self.disconnects = 0
        self._down_since: float | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Reach Redis (or raise BusUnavailable), read from the stream's current end, start the
        writer and the reader."""
        try:
            await self._redis.ping()
            last = await self._redis.xrevrange(STREAM, count=1)
        except _DOWN as e:
            raise BusUnavailable(f"cannot reach the event bus (bus.url, Redis): {e}") from None
        self._last_id = last[0][0].decode() if last else "0-0"
        self.writer_ok = self.reader_ok = True
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write_loop(), name="bus-writer"),
                       loop.create_task(self._read_loop(), name="bus-reader")]
        log.info("bus_connected", node_id=self.node_id, stream=STREAM, last_id=self._last_id)

    async def close(self) -> None:
        if self._tasks and self.buffered:
            deadline = time.monotonic() + CLOSE_FLUSH_S
            while self.buffered and self.writer_ok and time.monotonic() < deadline:
                self._wake.set()
                await asyncio.sleep(0.01)
            if self.buffered:
                log.warning("bus_closed_with_buffered_events", buffered=self.buffered)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._redis.aclose()

    # -- publishing ------------------------------------------------------------------------
    def publish(self, job_id: str, event: Any, *, owner: str = "", source: str = "") -> Envelope:
        env = super().publish(job_id, event, owner=owner, source=source)
        self._enqueue(env)
        return env

    @property
    def buffered(self) -> int:
        return len(self._buffer) + len(self._inflight)

    def _enqueue(self, env: Envelope) -> None:
        if self.buffered >= self.max_buffer:
            if not self.dropped:
                log.warning("bus_buffer_full", buffered=self.buffered, connected=self.connected)
            if env.event.type is EventType.PARTIAL:
                self._drop(env)
                return
            if self._partials_buffered:  # once per filling: while full, partials are not let in
                kept = deque(e for e in self._buffer if e.event.type is not EventType.PARTIAL)
                for _ in range(len(self._buffer) - len(kept)):
                    self._drop(None)
                self._buffer = kept
                self._partials_buffered = False
            if self.buffered >= self.max_buffer:
                if not self._buffer:
                    self._drop(env)
                    return
                self._drop(self._buffer.popleft())
        self._buffer.append(env)
        self._partials_buffered |= env.event.type is EventType.PARTIAL
        self._wake.set()

    def _drop(self, env: Envelope | None) -> None:
        """Count one envelope given up; `None` is a partial."""
        self.dropped += 1
        if env is None or env.event.type is EventType.PARTIAL:
            self.dropped_partials += 1

    async def _write_loop(self) -> None:
        failures = 0
        while True:
            if not self._inflight and not self._buffer and self.writer_ok:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._inflight:
                n = min(BATCH, len(self._buffer))
                self._inflight = [self._buffer.popleft() for _ in range(n)]
            try:
                if self._inflight:
                    pipe = self._redis.pipeline(transaction=False)
                    for env in self._inflight:
                        pipe.xadd(STREAM, {"e": encode_envelope(env)}, maxlen=STREAM_MAXLEN, approximate=True)
                    await pipe.execute()
                    self.sent += len(self._inflight)
                    self._inflight = []
                else:
                    await self._redis.ping()  # nothing to send: find out when Redis is back
            except _DOWN as e:
                self._set("writer_ok", False, e)
                await asyncio.sleep(self._backoff.compute(failures))
                failures += 1
                continue
            failures = 0
            self._set("writer_ok", True)

    # -- reading ---------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        failures = 0
        while True:
            try:
                got = await self._redis.xread({STREAM: self._last_id}, count=READ_COUNT, block=READ_BLOCK_MS)
            except _DOWN as e:
                self._set("reader_ok", False, e)
                await asyncio.sleep(self._backoff.compute(failures))
                failures += 1
                continue
            failures = 0
            self._set("reader_ok", True)
            for _stream, entries in got or ():
                for entry_id, fields in entries:
                    self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    self._take(self._last_id, fields)

    def _take(self, entry_id: str, fields: dict) -> None:
        try:
            env = decode_envelope(fields.get(b"e", b""))
        except ValueError as e:
            self.unreadable += 1
            log.warning("bus_entry_unreadable", entry_id=entry_id, error=str(e))
            return
        if env.node_id == self.node_id:
            return  # delivered locally when it was published
        key = (env.node_id, env.job_id)
        last = self._remote_seq.get(key, 0)
        if env.seq <= last:
            self.resends_skipped += 1
            return
        if env.event.type is EventType.CALL_ENDED:
            self._remote_seq.pop(key, None)
        else:
            self._remote_seq[key] = env.seq
            self._remote_seq.move_to_end(key)
            while len(self._remote_seq) > REMOTE_JOBS:
                self._remote_seq.popitem(last=False)
        self.received += 1
        self._deliver_remote(env)

    # -- state -----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.writer_ok and self.reader_ok

    def _set(self, side: str, ok: bool, error: BaseException | None = None) -> None:
        was = self.connected
        setattr(self, side, ok)
        if was and not self.connected:
            self.disconnects += 1
            self._down_since = time.monotonic()
            log.warning("bus_disconnected", side=side.removesuffix("_ok"), error=str(error),
                        buffered=self.buffered)
        elif not was and self.connected and self._tasks:
            down = time.monotonic() - self._down_since if self._down_since is not None else None
            log.info("bus_reconnected", down_s=round(down, 3) if down is not None else None,
                     buffered=self.buffered, dropped=self.dropped)

    def health(self) -> BusHealth:
        return BusHealth(self.url, self.connected, self.buffered, self.dropped, self.dropped_partials,
                         {"node_id": self.node_id, "sent": self.sent, "received": self.received,
                          "disconnects": self.disconnects})
