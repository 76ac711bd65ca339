"""Store writes that could not be made while the database was unreachable, retried in order.

Why: a live call's finals are sent to its client (and published) the moment they are decoded; a
database that is down or restarting (PostgreSQL failover, a network cut) must neither stop the
captions nor lose what the client already saw. So a write that fails for any reason but a full
disk (which ends the call: bridge/storage.py) is queued here and retried with backoff until it
lands, and every later write queues behind it, so they land in the order they were made (a job's
`finish` after its last segment, a settlement after the job's end). Only failures of reaching the
database are retried (`transient`); a write the database refuses (its job deleted meanwhile, a
constraint) would fail forever and hold every later write behind it: it raises on its first try
and is dropped, logged as `write_dropped`, when it fails that way on a retry. `/healthz` reports the
backlog (status `degraded` while it is not empty); the service waits for it when it stops.

The queue lives in memory: writes still queued when the process dies are lost, as is anything a
crash loses, and `stop` logs how many it gave up (`backlog_abandoned`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bridge.logs import get_logger
from bridge.storage import is_storage_full

__all__ = ["WriteBacklog", "transient"]

log = get_logger("bridge.backlog")

RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0
# How long a write may take before it is left to the background; a write cut off here may still
# commit, so the stores' writes are idempotent (add_segment finds a final it already holds).
FIRST_TRY_S = 3.0
RETRY_TRY_S = 10.0  # a retry on a connection a network cut left hanging gives up after this


def transient(exc: BaseException) -> bool:
    """A failure to reach the database, worth retrying: a timeout, a connection error, or the
    drivers' OperationalError / InterfaceError (sqlite3's and psycopg's, whose pool timeout is
    one too), told by class name so this module needs neither driver. Anything else (KeyError for
    a job deleted meanwhile, an IntegrityError, a ValueError) is the database's answer."""
    if isinstance(exc, (asyncio.TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and not is_storage_full(exc):
        return True
    return any(c.__name__ in ("OperationalError", "InterfaceError") for c in type(exc).__mro__) \
        and not is_storage_full(exc)


@dataclass
class _Write:
    job_id: str
    what: str
    make: Callable[[], Awaitable[object]]
    queued_at: float = field(default_factory=time.time)


class WriteBacklog:
    """One FIFO of deferred writes for the whole service (event loop only)."""

    def __init__(self, retry_first_s: float = RETRY_FIRST_S, retry_max_s: float = RETRY_MAX_S,
                 first_try_s: float = FIRST_TRY_S, retry_try_s: float = RETRY_TRY_S) -> None:
        self.first_try_s = first_try_s
        self.retry_try_s = retry_try_s
        self.retry_first_s = retry_first_s
        self.retry_max_s = retry_max_s
        self._q: deque[_Write] = deque()
        self._task: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.deferred_total = 0  # writes that had to wait, since start
        self.retried_total = 0  # attempts after the first
        self.dropped_total = 0  # queued writes the database refused on a retry (logged)
        self.last_error: str | None = None
        self.since: float | None = None  # when the oldest queued write was queued

    @property
    def pending(self) -> int:
        return len(self._q)

    def state(self) -> dict[str, object]:
        return {"ok": not self._q, "pending_writes": len(self._q), "deferred_total": self.deferred_total,
                "oldest_s": round(time.time() - self.since, 1) if self.since is not None else None,
                "last_error": self.last_error}

    async def write(self, job_id: str, what: str, make: Callable[[], Awaitable[object]]) -> bool:
        """Make the write now, or queue it: True if it landed now. A full disk, or any answer of
        the database that is not `transient`, is raised (the caller ends the call, or logs it);
        a transient failure queues it. Queued writes are never overtaken."""
        if not self._q:
            try:
                # bounded, so an unreachable database holds a call's events for at most this long once
                await asyncio.wait_for(make(), self.first_try_s)
                return True
            except (Exception, asyncio.TimeoutError) as e:  # noqa: BLE001 - only transient ones are retried
                if not transient(e):
                    raise
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                log.warning("write_deferred", job_id=job_id, what=what, error=self.last_error)
        self._q.append(_Write(job_id, what, make))
        self.deferred_total += 1
        if self.since is None:
            self.since = self._q[0].queued_at
        self._idle.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="write-backlog")
        return False

    async def _drain(self) -> None:
        delay = self.retry_first_s
        while self._q:
            head = self._q[0]
            await asyncio.sleep(delay)
            try:
                self.retried_total += 1
                await asyncio.wait_for(head.make(), self.retry_try_s)
            except (Exception, asyncio.TimeoutError) as e:  # noqa: BLE001
                if not transient(e):  # the database answered, and will answer so again: drop it
                    self._q.popleft()
                    self.dropped_total += 1
                    self.since = self._q[0].queued_at if self._q else None
                    log.error("write_dropped", job_id=head.job_id, what=head.what, error=repr(e)[:300])
                    delay = 0.0
                    continue
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                delay = min(self.retry_max_s, max(delay, self.retry_first_s) * 2)
                continue
            self._q.popleft()
            self.since = self._q[0].queued_at if self._q else None
            delay = 0.0  # the database answers again: write the rest at once
            log.info("write_recovered", job_id=head.job_id, what=head.what,
                     waited_s=round(time.time() - head.queued_at, 2), pending=len(self._q))
            if not self._q:
                delay = self.retry_first_s
        self.since = None
        self.last_error = None
        self._idle.set()

    async def flush(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the backlog to land; returns how many writes are still queued
        (then abandoned and logged: the process is stopping)."""
        if self._q:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        left = len(self._q)
        if left:
            log.error("backlog_abandoned", pending=left, jobs=sorted({w.job_id for w in self._q}),
                      last_error=self.last_error)
        if self._task is not None:
            self._task.cancel()
        return left
