"""One publish path for every job's events, fanned out to subscribers that never block a leg.

`EventBus` is the interface the service codes against; `InProcessBus` is the single-node default
and `RedisBus` (bridge/events/redisbus.py) the one for several nodes; bridge/events/registry.py
picks one by `bus.url`. Each envelope carries its routing attributes (`owner`, `source`) and the
node that published it (`node_id`), so a remote consumer needs no lookup.

`publish` is synchronous and never awaits: it numbers the event (`seq`, per job, from 1: a job
lives on one node, so that node numbers it) and puts it on each matching subscriber's queue. A
subscriber whose queue is full loses partials first (they are superseded anyway) and is cut off
with `overflowed` set if even a final, usage or lifecycle event does not fit, so one stalled
dashboard cannot grow memory without bound. Finals are written to the job store before they are
published (see bridge/calls.py), so a subscriber that joins late reads the earlier ones from the
store and never misses one.

`local=True` subscriptions (and taps, unless added with `remote=True`) see only what this process
published: the webhook outbox enqueues its own node's events, so N nodes do not enqueue N copies.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.logs import get_logger

from .types import EventType

log = get_logger("bridge.events.bus")

__all__ = ["BusHealth", "Envelope", "EventBus", "InProcessBus", "Subscription", "new_node_id"]


def new_node_id() -> str:
    """A random id for a process that was given none (the cluster's node id replaces it)."""
    return "node_" + secrets.token_hex(6)


@dataclass(frozen=True)
class Envelope:
    job_id: str
    seq: int
    event: Any
    owner: str = ""  # the job's owner (API key id or jwt:<sub>): who may see this event
    source: str = ""  # the job's ingress: stream, sip or webrtc
    node_id: str = ""  # the node that published it (the job's node)

    def to_dict(self, with_job: bool = True) -> dict[str, Any]:
        d = self.event.to_dict()
        if with_job:
            d["job_id"] = self.job_id
            d["seq"] = self.seq
        return d


@dataclass(frozen=True)
class BusHealth:
    """What /healthz says about the bus: where it is (no password), whether this node reaches it,
    and what waits for it or was given up while it could not be reached."""

    url: str
    connected: bool
    buffered: int = 0  # envelopes waiting to be sent to the shared bus
    dropped: int = 0  # envelopes given up (buffer full), partials and others
    dropped_partials: int = 0  # of `dropped`, partials
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "connected": self.connected, "buffered": self.buffered,
                "dropped": self.dropped, "dropped_partials": self.dropped_partials, **self.extra}


class Subscription:
    """An async iterator of Envelopes; `None` job_id means every job; `local` only this node's."""

    def __init__(self, bus: InProcessBus, job_id: str | None, maxsize: int, local: bool = False) -> None:
        self._bus = bus
        self.job_id = job_id
        self.maxsize = maxsize
        self.local = local
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

    node_id: str  # stamped on every envelope this process publishes

    @abstractmethod
    def publish(self, job_id: str, event: Any, *, owner: str = "", source: str = "") -> Envelope:
        """Number `event` (seq per job, from 1) and fan it out; never blocks, never awaits."""

    @abstractmethod
    def subscribe(self, job_id: str | None = None, *, maxsize: int = 10000, local: bool = False) -> Subscription:
        """A bounded subscription to one job's events, or to every job's (`None`); `local=True`:
        only envelopes this process published."""

    @abstractmethod
    def add_tap(self, tap: Callable[[Envelope], None], *, remote: bool = False) -> None:
        """Call `tap(envelope)` synchronously on every publish of this process, before the
        subscribers are offered it: for in-memory indexes and outboxes that must never lag or
        drop. Keep it cheap. `remote=True`: also on every envelope another node published."""

    async def start(self) -> None:
        """Connect (a shared bus); raise a one-line error when that is impossible."""

    async def close(self) -> None:
        """Send what is still buffered (bounded), then disconnect."""

    @abstractmethod
    def health(self) -> BusHealth:
        """The bus's state for /healthz."""


class InProcessBus(EventBus):
    """The embedded bus: plain dicts and asyncio queues in the service process. It is also the
    local half of a shared bus (RedisBus): remote envelopes enter through `_deliver_remote`."""

    url = "memory://"

    def __init__(self, *, node_id: str = "") -> None:
        self.node_id = node_id or new_node_id()
        self._subs: dict[str | None, list[Subscription]] = {}
        self._seq: dict[str, itertools.count] = {}
        # the last seq of each job another node is publishing (until its call_ended): a job this
        # node goes on publishing for (a dead node's, taken over) continues its numbering
        self._remote_seq: dict[str, int] = {}
        self._taps: list[tuple[Callable[[Envelope], None], bool]] = []
        self.published = 0

    def add_tap(self, tap: Callable[[Envelope], None], *, remote: bool = False) -> None:
        self._taps.append((tap, remote))

    def subscribe(self, job_id: str | None = None, *, maxsize: int = 10000, local: bool = False) -> Subscription:
        sub = Subscription(self, job_id, maxsize, local)
        self._subs.setdefault(job_id, []).append(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.job_id)
        if subs and sub in subs:
            subs.remove(sub)
            if not subs:
                del self._subs[sub.job_id]

    def publish(self, job_id: str, event: Any, *, owner: str = "", source: str = "") -> Envelope:
        counter = self._seq.get(job_id)
        if counter is None:
            counter = self._seq[job_id] = itertools.count(self._remote_seq.pop(job_id, 0) + 1)
        env = Envelope(job_id, next(counter), event, owner, source, self.node_id)
        self.published += 1
        self._fan_out(env, remote=False)
        if event.type is EventType.CALL_ENDED:
            self._seq.pop(job_id, None)
        return env

    def _deliver_remote(self, env: Envelope) -> None:
        """An envelope another node published: to the remote taps and the non-local subscribers."""
        if env.event.type is EventType.CALL_ENDED:
            self._remote_seq.pop(env.job_id, None)
        else:
            self._remote_seq[env.job_id] = max(env.seq, self._remote_seq.get(env.job_id, 0))
        self._fan_out(env, remote=True)

    def _fan_out(self, env: Envelope, *, remote: bool) -> None:
        for tap, wants_remote in self._taps:
            if remote and not wants_remote:
                continue
            try:
                tap(env)
            except Exception as e:  # noqa: BLE001 - a broken sink must not stop the others or the leg
                log.error("bus_tap_failed", job_id=env.job_id, tap=repr(tap), error=repr(e))
        for key in (env.job_id, None):
            for sub in list(self._subs.get(key, ())):
                if remote and sub.local:
                    continue
                sub._offer(env)

    def health(self) -> BusHealth:
        return BusHealth(self.url, True)
