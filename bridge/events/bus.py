"""One publish path for every job's events, fanned out to subscribers that never block a leg.

`EventBus` is the interface the service codes against; `InProcessBus` is the single-node default.
A shared broker (Redis Streams, NATS) can implement the same three calls for several nodes: each
envelope carries its routing attributes (`owner`, `source`) so a remote consumer needs no lookup.

`publish` is synchronous and never awaits: it numbers the event (`seq`, per job, from 1) and
puts it on each matching subscriber's queue. A subscriber whose queue is full loses partials
first (they are superseded anyway) and is cut off with `overflowed` set if even a final, usage
or lifecycle event does not fit, so one stalled dashboard cannot grow memory without bound.
Finals are written to the job store before they are published (see bridge/calls.py), so a
subscriber that joins late reads the earlier ones from the store and never misses one.
"""

from __future__ import annotations

import asyncio
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.logs import get_logger

from .types import EventType

log = get_logger("bridge.events.bus")

__all__ = ["Envelope", "EventBus", "InProcessBus", "Subscription"]


@dataclass(frozen=True)
class Envelope:
    job_id: str
    seq: int
    event: Any
    owner: str = ""  # the job's owner (API key id or jwt:<sub>): who may see this event
    source: str = ""  # the job's ingress: stream, sip or webrtc

    def to_dict(self, with_job: bool = True) -> dict[str, Any]:
        d = self.event.to_dict()
        if with_job:
            d["job_id"] = self.job_id
            d["seq"] = self.seq
        return d


class Subscription:
    """An async iterator of Envelopes; `None` job_id means every job."""

    def __init__(self, bus: InProcessBus, job_id: str | None, maxsize: int) -> None:
        self._bus = bus
        self.job_id = job_id
        self.maxsize = maxsize
        self._q: asyncio.Queue[Envelope | None] = asyncio.Queue()
        self.dropped_partials = 0
        self.overflowed = False
        self.closed = False

    def _offer(self, env: Envelope) -> None:
        if self.closed:
            return
        if self._q.qsize() >= self.maxsize:
            if env.event.type is EventType.PARTIAL:
                self.dropped_partials += 1
                return
            self.overflowed = True
            self.close()
            return
        self._q.put_nowait(env)

    def close(self) -> None:
        """Stop receiving; iteration ends after what is already queued."""
        if not self.closed:
            self.closed = True
            self._bus._remove(self)
            self._q.put_nowait(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Envelope:
        env = await self._q.get()
        if env is None:
            raise StopAsyncIteration
        return env


class EventBus(ABC):
    """Where every job's events go out: numbered per job, offered to taps, then to subscribers."""

    @abstractmethod
    def publish(self, job_id: str, event: Any, *, owner: str = "", source: str = "") -> Envelope:
        """Number `event` (seq per job, from 1) and fan it out; never blocks, never awaits."""

    @abstractmethod
    def subscribe(self, job_id: str | None = None, maxsize: int = 10000) -> Subscription:
        """A bounded subscription to one job's events, or to every job's (`None`)."""

    @abstractmethod
    def add_tap(self, tap: Callable[[Envelope], None]) -> None:
        """Call `tap(envelope)` synchronously on every publish, before the subscribers are offered
        it: for in-memory indexes and outboxes that must never lag or drop. Keep it cheap."""


class InProcessBus(EventBus):
    """The embedded bus: plain dicts and asyncio queues in the service process."""

    def __init__(self) -> None:
        self._subs: dict[str | None, list[Subscription]] = {}
        self._seq: dict[str, itertools.count] = {}
        self._taps: list[Callable[[Envelope], None]] = []
        self.published = 0

    def add_tap(self, tap: Callable[[Envelope], None]) -> None:
        self._taps.append(tap)

    def subscribe(self, job_id: str | None = None, maxsize: int = 10000) -> Subscription:
        sub = Subscription(self, job_id, maxsize)
        self._subs.setdefault(job_id, []).append(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.job_id)
        if subs and sub in subs:
            subs.remove(sub)
            if not subs:
                del self._subs[sub.job_id]

    def publish(self, job_id: str, event: Any, *, owner: str = "", source: str = "") -> Envelope:
        counter = self._seq.setdefault(job_id, itertools.count(1))
        env = Envelope(job_id, next(counter), event, owner, source)
        self.published += 1
        for tap in self._taps:
            try:
                tap(env)
            except Exception as e:  # noqa: BLE001 - a broken sink must not stop the others or the leg
                log.error("bus_tap_failed", job_id=job_id, tap=repr(tap), error=repr(e))
        for key in (job_id, None):
            for sub in list(self._subs.get(key, ())):
                sub._offer(env)
        if event.type is EventType.CALL_ENDED:
            self._seq.pop(job_id, None)
        return env
