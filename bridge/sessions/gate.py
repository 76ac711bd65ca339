"""Admission and settlement of every session, whatever its ingress (stream, WebRTC, SIP).

A session is admitted in steps, each undone if a later one refuses, so a refused session leaves no
job, no slot and no reservation: the server is open (not draining, disk above its reserve), the
owner is under its session limit (`limits.max_sessions_per_key`), the decode pool has room for
its legs (bridge/admission.py), and the owner's key can hold the credits of the session's maximum
duration x its channels. What passed is a `Ticket`; opening it creates the job and its Call.
At the end the job is saved with the status its ending gives it (`job_ending`) and the credits
of the audio actually received are charged, the rest of the reservation released.

The checks up to the capacity hold run in one step without yielding, so sessions (or SIP INVITEs)
arriving together cannot pass on the same counts. Then two store steps are awaited, each atomic in
the store itself: the owner's live-session row (`NodeStore.open_session`: the session limit counted
over every node sharing the database, docs/cluster.md; the local count before it only spares a
round trip when this node alone is already at the limit), then the credit reservation. A refusal
or cancel after them undoes both, the reservation first: a live-session row outlives its
reservation, so a reservation no row holds is an orphan another node may settle.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from bridge.admission import Admission, CapacityRefused, Reservation
from bridge.backlog import WriteBacklog
from bridge.calls import Call, CallRegistry, credits_for
from bridge.config import Config
from bridge.events.bus import EventBus, Subscription
from bridge.jobs.model import Job, JobSource, new_job_id
from bridge.logs import get_logger
from bridge.metrics import Metrics
from bridge.recognizer.streamer import StreamerConfig
from bridge.recordings import Recordings
from bridge.sessions.errors import ErrorCode, SessionError, failure_error, job_ending
from bridge.storage import StorageGuard, is_storage_full
from bridge.stores import InsufficientCredits, JobStore, KeyStore, NodeStore, SessionLimitReached

__all__ = ["SessionGate", "Ticket"]

log = get_logger("bridge.sessions")


class Ticket:
    """A session admitted and not yet ended: its owner's slot, the capacity held for its legs
    until its call is registered, and its credit reservation (keyed by the job id it will have).

    For SIP, the hold the dispatcher keeps per admitted INVITE (bridge/ingress/sip.py's
    `_InviteHold`, a sip.transactions.Hold) wraps it: `release()` when the INVITE fails."""

    def __init__(self, gate: "SessionGate", owner: str, source: JobSource, channels: int,
                 capacity: Reservation | None) -> None:
        self.gate = gate
        self.owner = owner
        self.source = source
        self.channels = channels
        self.job_id = new_job_id()
        self.credits_held = 0
        self.opened = False
        self.cancelled = False
        self._capacity = capacity

    def release(self) -> None:
        """The capacity hold is no longer needed: the call is registered (its legs count as live)
        or it will never be. A ticket that was never opened is cancelled with it."""
        if self._capacity is not None:
            self._capacity.release()
        if not self.opened:
            self.cancel()

    def cancel(self) -> None:
        """Undo the admission of a session that will not open: slot and capacity now, the credit
        reservation and the live-session row in a task (the SIP dispatcher calls this from
        synchronous code)."""
        if self._drop():
            self.gate.background(self._undo(), "reservation_not_released")

    async def cancel_async(self) -> None:
        """`cancel`, waiting for the credits and the live-session row to be released."""
        if self._drop():
            await self._undo()

    async def _undo(self) -> None:
        """The reservation first, then the row (see the module doc). The row goes even if the
        release failed: a stuck row would hold the owner's slot on every node, while a reservation
        without its row is an orphan the next start or take-over settles."""
        try:
            await self.gate.keys.settle(self.job_id, 0)
        finally:
            await self.gate.end_session(self.job_id)

    def _drop(self) -> bool:
        if self.opened or self.cancelled:
            return False
        self.cancelled = True
        if self._capacity is not None:
            self._capacity.release()
        self.gate.calls.release(self.owner)
        return True


class SessionGate:
    """Admits, opens, concludes and settles sessions for every ingress (see the module doc)."""

    def __init__(self, config: Config, *, calls: CallRegistry, capacity: Admission, keys: KeyStore,
                 store: JobStore, nodes: NodeStore, node_id: str, bus: EventBus, pool: Any, storage: StorageGuard,
                 metrics: Metrics, recordings: Recordings, backlog: WriteBacklog) -> None:
        self.config = config
        self.nodes = nodes
        self.node_id = node_id
        self.calls = calls
        self.capacity = capacity
        self.keys = keys
        self.store = store
        self.bus = bus
        self.pool = pool
        self.storage = storage
        self.metrics = metrics
        self.recordings = recordings
        self.backlog = backlog
        self._tasks: set[asyncio.Task] = set()
        self._session_rows: set[str] = set()  # job ids of open sessions whose live-session row is ours to end

    async def aclose(self) -> None:
        """Wait for the credit releases still running (before the stores close)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def background(self, work: Any, failure_event: str) -> None:
        """Run store work nobody waits for (a cancelled ticket's release), logging a failure; an
        unreleased reservation is settled from the recording at the next start anyway."""

        async def run() -> None:
            try:
                await work
            except Exception as e:  # noqa: BLE001
                log.error(failure_event, error=repr(e))

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- admission -----------------------------------------------------------------------------
    def _refused(self, source: JobSource, err: SessionError) -> SessionError:
        self.metrics.sessions_refused.labels(source.value, err.code.value).inc()
        return err

    def _hold(self, owner: str, channels: int, source: JobSource, *, capacity: bool) -> Ticket:
        """Open server, the owner's session slot, capacity for `channels` legs (unless `capacity`
        is False: a call already answered elsewhere)."""
        if self.calls.draining:
            raise self._refused(source, SessionError(ErrorCode.UPSTREAM_ERROR,
                                                     "the server is shutting down; retry on another node"))
        refusal = self.storage.refusal()
        if refusal is not None:
            raise self._refused(source, SessionError(ErrorCode.STORAGE_FULL, refusal))
        limit = self.config.limits.max_sessions_per_key
        if not self.calls.admit(owner, limit):
            raise self._over_limit(source, self.calls.active(owner), limit)
        held = None
        if capacity:
            try:
                held = self.capacity.reserve(channels)
            except CapacityRefused as e:
                self.calls.release(owner)
                self.metrics.capacity_refused.labels(source.value).inc()
                raise self._refused(source, SessionError.over_capacity(e)) from None
        return Ticket(self, owner, source, channels, held)

    def _credits(self, max_duration_s: float, channels: int) -> int:
        return math.ceil(credits_for(max_duration_s, channels, self.config.credits.per_minute))

    def _short(self, ticket: Ticket, e: InsufficientCredits, max_duration_s: float, hint: str) -> SessionError:
        return self._refused(ticket.source, SessionError(
            ErrorCode.INSUFFICIENT_CREDITS,
            f"balance {e.balance} credits is short of the {e.needed} reserved for a session of up to "
            f"{max_duration_s:g} s x {ticket.channels} channel(s) at {self.config.credits.per_minute} credits/min; "
            f"{hint}"))

    def _over_limit(self, source: JobSource, live: int, limit: int) -> SessionError:
        return self._refused(source, SessionError(
            ErrorCode.RATE_LIMITED, f"{live} sessions already live for this key (limit {limit})"))

    async def end_session(self, job_id: str) -> None:
        """Remove the session's live-session row (it no longer counts against its owner on any node)."""
        self._session_rows.discard(job_id)
        await self.nodes.end_session(job_id)

    async def admit(self, owner: str, channels: int, max_duration_s: float, source: JobSource, *,
                    hint: str = "lower max_duration_seconds or add credits", capacity: bool = True) -> Ticket:
        """Admit a session of up to `max_duration_s` x `channels`; raises SessionError (UPSTREAM_ERROR
        while draining, STORAGE_FULL, RATE_LIMITED for the owner's session limit or the server's
        decode capacity, INSUFFICIENT_CREDITS with `hint` saying what to do). `capacity` False:
        a call already answered elsewhere (no capacity check)."""
        ticket = self._hold(owner, channels, source, capacity=capacity)
        try:
            try:  # the authority: this owner's sessions on every node
                await self.nodes.open_session(ticket.job_id, owner, self.node_id,
                                              self.config.limits.max_sessions_per_key)
            except SessionLimitReached as e:
                raise self._over_limit(source, e.live, e.limit) from None
            credits = self._credits(max_duration_s, channels)
            await self.keys.reserve(owner, ticket.job_id, credits)
            ticket.credits_held = credits
        except BaseException as e:
            full = is_storage_full(e)  # the live-session row could not be written: SQLite on a full disk
            if full:
                self.storage.exhaust(e)  # frees the emergency reserve: the undo below can commit
            await ticket.cancel_async()
            if isinstance(e, InsufficientCredits):
                raise self._short(ticket, e, max_duration_s, hint) from None
            if full:
                raise self._refused(source, failure_error(e)) from None
            raise
        return ticket

    # -- the call ------------------------------------------------------------------------------
    def new_call(self, ticket: Ticket, *, config: dict[str, Any], speakers: list[str], metadata: dict[str, Any],
                 streamer: StreamerConfig) -> Call:
        """The Call of an admitted session (not open yet): its job as the ingress describes it."""
        job = Job(id=ticket.job_id, owner=ticket.owner, source=ticket.source, config=config, speakers=list(speakers),
                  metadata=metadata, node_id=self.node_id)
        return Call(job, store=self.store, bus=self.bus, pool=self.pool, streamer_config=streamer,
                    recordings=self.recordings, credits_per_minute=self.config.credits.per_minute,
                    usage_interval_s=self.config.credits.usage_interval_s, storage=self.storage,
                    backlog=self.backlog)

    async def open(self, ticket: Ticket, call: Call, *, subscribe: bool = True) -> Subscription | None:
        """Create the job and start the call; it counts as live from here. Returns a bus subscription
        to its events when `subscribe` (the ingress forwards them to its client). If opening fails the
        ticket is cancelled (no slot, no reservation) and the error raised (STORAGE_FULL as a SessionError)."""
        sub = None
        try:
            if subscribe:
                sub = self.bus.subscribe(call.id)
            await call.open()
            if ticket.cancelled:  # given up while the job was being created (e.g. at shutdown): end it
                withdrawn = SessionError(ErrorCode.UPSTREAM_ERROR, "the session was withdrawn while it opened")
                await call.finish(*job_ending(withdrawn))
                raise withdrawn
        except BaseException as e:
            full = is_storage_full(e)  # the disk filled between the check and the first write
            if full:
                self.storage.exhaust(e)  # frees the emergency reserve: the settle below can commit
            if sub is not None:
                sub.close()
            await ticket.cancel_async()
            if full:
                raise failure_error(e) from None
            raise
        self.calls.add(call, ticket.owner)
        self._session_rows.add(call.id)
        ticket.opened = True
        ticket.release()  # its legs now count as live
        self.metrics.sessions.labels(ticket.source.value).inc()
        return sub

    # -- the end -------------------------------------------------------------------------------
    async def conclude(self, call: Call, err: SessionError | None) -> SessionError | None:
        """Save the job as its ending (`err`, None for a clean end) says, then charge the audio it
        received. Returns the error the client should be told, which may be one that happened
        while saving (a full disk)."""
        status, error = job_ending(err)
        try:
            await call.finish(status, error)
        except Exception as e:  # noqa: BLE001 - the client still gets an error frame before the close
            call.log.error("call_not_saved", error=repr(e))
            err = failure_error(e) if is_storage_full(e) else SessionError(
                ErrorCode.INTERNAL, f"the session could not be saved: {type(e).__name__}")
        if err is None and call.storage_error is not None:  # the disk filled as the session ended
            err = failure_error(call.storage_error)
        try:
            await self.settle(call)
        except Exception as e:  # noqa: BLE001
            call.log.error("usage_not_settled", error=repr(e))  # an orphan now: settled from the recording
        # after the settlement (queued behind it while the database is away: bridge/backlog.py): a
        # reservation without its row is an orphan that another node would settle (bridge/cluster/recovery.py)
        self._session_rows.discard(call.id)
        try:
            await self.backlog.write(call.id, "end_session", lambda: self.nodes.end_session(call.id))
        except Exception as e:  # noqa: BLE001
            call.log.error("live_session_not_ended", error=repr(e))  # removed at this node's restart
        return err

    async def settle(self, call: Call) -> None:
        """Charge what the finished session used (releasing the rest of its reservation) and count its audio."""
        used = math.ceil(call.credits_used)
        await self.backlog.write(call.id, "settle", lambda: self.keys.settle(call.id, used))
        self.metrics.audio_seconds.labels(call.job.source.value).inc(call.streamed_seconds * call.channels)

    def leave(self, call: Call) -> None:
        """The session is over: it no longer counts as live, nor against its owner's limit (its
        live-session row went with `conclude`, or goes now if the session ended without one)."""
        self.calls.remove(call)
        self.calls.release(call.job.owner)
        if call.id in self._session_rows:
            self.background(self.end_session(call.id), "live_session_not_ended")
