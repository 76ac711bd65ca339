"""The dispatcher's transactions and their timers: what it remembers about each request it
forwards, for how long, and the retransmission timer towards a worker.

- `TransactionTable.invites`: the caller-facing state of each initial INVITE
  (`InviteTransaction`), keyed by (Call-ID, caller's branch): absorbs retransmissions (answering
  with the last response sent), finds the worker for CANCEL and for the ACK of a non-2xx final
  response, and remembers which workers were tried.
- `clients`: every request sent to a worker (`ClientTransaction`), keyed by (our branch,
  method): routes responses back to the caller over the transport the request came in on.
- `retrans`: a caller's (Call-ID, branch, method) -> client key, for retransmitted in-dialog
  requests and the ACK of a non-2xx answer to a re-INVITE.
- `dialogs`: Call-ID -> (worker id, expires), for in-dialog requests that reach the dispatcher.

Entries expire (64*T1 = 32 s after a final response; established calls after the dispatcher's
`dialog_ttl`) and every table is capped (`max_entries`, oldest evicted first), so memory stays
bounded under any traffic. An INVITE counts its slots against its worker (`pending`) until a
`load` report that follows the worker's first answer to it or a final response, and holds the
service's admission (`Hold`) until its call is registered or it ends otherwise.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sip.message import MAGIC_COOKIE, SipMessage, Via
from sip.routing import Worker
from sip.transport import Origin

__all__ = ["LINGER_S", "PENDING_TTL_S", "T1", "T2", "ClientTransaction", "Hold", "InviteTransaction",
           "TransactionTable"]

T1 = 0.5  # RFC 3261 round-trip estimate
T2 = 4.0
LINGER_S = 64 * T1  # how long a finished transaction is remembered (absorbs retransmissions)
PENDING_TTL_S = 300.0  # an INVITE without a final response is forgotten after this (Timer C-like)


class Hold(Protocol):
    """What the service's admission check keeps for an admitted INVITE (the service's session ticket
    and capacity hold); released when the INVITE fails or its call is registered."""

    def release(self) -> None: ...


@dataclass(eq=False)
class ClientTransaction:
    """A request we sent to a worker, keyed by (branch, method)."""

    branch: str
    method: str
    data: bytes
    request: SipMessage
    worker: Worker
    origin: Origin | None
    invite: InviteTransaction | None
    expires: float
    deadline: float = 0.0
    responded: bool = False
    provisional: bool = False  # sent an 18x: the worker took the call (a later failure is the call's own)
    final: int | None = None
    abandoned: bool = False  # failed over / timed out: late responses are ACKed (or hung up), not relayed
    local: bool = False  # generated here (our CANCEL, ACK-then-BYE): responses are absorbed
    timer: asyncio.TimerHandle | None = None
    index_key: tuple[str, str, str] | None = None


@dataclass(eq=False)
class InviteTransaction:
    """The caller-facing side of an initial INVITE, keyed by (Call-ID, caller's branch)."""

    key: tuple[str, str]
    request: SipMessage  # as received, top Via with received/rport
    origin: Origin
    needed: int
    expires: float
    tried: list[int] = field(default_factory=list)
    current: ClientTransaction | None = None
    counted: bool = False  # `needed` is in current.worker.pending
    last_response: bytes | None = None
    last_via: Via | None = None
    final: int | None = None
    local: bool = False  # the final response was generated here: its ACK stops here
    cancelled: bool = False
    hold: Hold | None = None  # the admitted legs, until the call is registered or the INVITE fails


def invite_key(msg: SipMessage, via: Via) -> tuple[str, str]:
    """The key of the INVITE transaction `msg` (an INVITE, or its CANCEL or ACK) belongs to."""
    b = via.branch
    if b and b.startswith(MAGIC_COOKIE):
        return msg.call_id or "", b
    cseq = msg.cseq  # RFC 2543 peer without a unique branch: match on From-tag and CSeq number
    return msg.call_id or "", f"2543:{msg.from_tag}:{cseq[0] if cseq else 0}"


class TransactionTable:
    """The tables above, their expiry and caps, and the timers that run on their entries."""

    def __init__(self, max_entries: int, counts: Counter[str], log: Any) -> None:
        self.max_entries = max_entries
        self.counts = counts
        self.log = log
        self.invites: dict[tuple[str, str], InviteTransaction] = {}
        self.clients: dict[tuple[str, str], ClientTransaction] = {}
        self.retrans: dict[tuple[str, str, str], tuple[str, str]] = {}
        self.dialogs: dict[str, tuple[int, float]] = {}

    # ------------------------------------------------------------------ entries
    def put(self, table: dict, key: Any, value: Any) -> None:
        """Insert, evicting the oldest entry past `max_entries` (a flood cannot grow memory)."""
        table.pop(key, None)
        table[key] = value
        while len(table) > self.max_entries:
            old_key = next(iter(table))
            self.drop(table, old_key)

    def drop(self, table: dict, key: Any) -> None:
        v = table.pop(key, None)
        if isinstance(v, ClientTransaction):
            if v.timer is not None:
                v.timer.cancel()
            if v.index_key is not None and self.retrans.get(v.index_key) == key:
                del self.retrans[v.index_key]
        elif isinstance(v, InviteTransaction):
            self.release(v)
            self.settle(v)
            if v.current is not None and v.current.timer is not None:
                v.current.timer.cancel()
                v.current.timer = None

    def sweep(self, now: float | None = None) -> None:
        """Forget expired transactions and dialogs."""
        now = time.monotonic() if now is None else now
        for k in [k for k, c in self.clients.items() if c.expires <= now]:
            self.drop(self.clients, k)
        for k in [k for k, i in self.invites.items() if i.expires <= now]:
            self.drop(self.invites, k)
        for k in [k for k, ck in self.retrans.items() if ck not in self.clients]:
            del self.retrans[k]
        for k in [k for k, (_, exp) in self.dialogs.items() if exp <= now]:
            del self.dialogs[k]

    async def sweep_loop(self) -> None:
        """`sweep` every second, for as long as the dispatcher runs."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - keep sweeping
                self.counts["internal_errors"] += 1
                self.log.exception("sip_internal_error", where="sweep")

    def cancel_timers(self) -> None:
        for c in self.clients.values():
            if c.timer is not None:
                c.timer.cancel()

    def clear(self) -> None:
        """Forget everything (the dispatcher stops): timers cancelled, admission holds given back."""
        self.cancel_timers()
        self.clients.clear()
        for inv in self.invites.values():
            self.settle(inv)
        self.invites.clear()
        self.retrans.clear()
        self.dialogs.clear()

    # ------------------------------------------------------------------ dialogs
    def dialog_worker_id(self, call_id: str | None) -> int | None:
        entry = self.dialogs.get(call_id or "")
        return None if entry is None else entry[0]

    def expire_dialog(self, call_id: str | None, after: float, only_worker: int | None) -> None:
        entry = self.dialogs.get(call_id or "")
        if entry is not None and (only_worker is None or entry[0] == only_worker):
            self.dialogs[call_id or ""] = (entry[0], time.monotonic() + after)

    # ------------------------------------------------------------------ slots and admission
    def count(self, inv: InviteTransaction, worker: Worker) -> None:
        """Count the INVITE's slots as pending on the worker it was just sent to."""
        worker.pending += inv.needed
        inv.counted = True

    def release(self, inv: InviteTransaction) -> None:
        """Stop counting this INVITE's slots as pending on its worker."""
        if inv.counted and inv.current is not None:
            w = inv.current.worker
            w.pending = max(0, w.pending - inv.needed)
        inv.counted = False

    def unanswered_slots(self, worker: Worker) -> int:
        """On a `load` report from `worker`: the slots of INVITEs it has not answered yet (the
        report may not reflect them). Ones it has answered are in the report from now on."""
        pending = 0
        for inv in self.invites.values():
            if inv.counted and inv.current is not None and inv.current.worker is worker:
                if inv.current.responded:
                    inv.counted = False
                else:
                    pending += inv.needed
        return pending

    def settle(self, inv: InviteTransaction) -> None:
        """Give back the INVITE's admission hold (its call is registered, or there will be none)."""
        if inv.hold is not None:
            inv.hold.release()
            inv.hold = None

    def settle_call(self, call_id: str | None) -> None:
        """The service registered the call of this Call-ID, or could not: no hold is needed."""
        for inv in self.invites.values():
            if inv.hold is not None and inv.request.call_id == call_id:
                self.settle(inv)

    # ------------------------------------------------------------------ timers
    def arm(self, c: ClientTransaction, interval: float, resend: Callable[[ClientTransaction], None],
            on_timeout: Callable[[ClientTransaction], None]) -> None:
        """Timer A/B towards the worker: resend the request until it answers anything (interval
        doubling up to T2); with no answer by `c.deadline`, `on_timeout`."""
        loop = asyncio.get_running_loop()
        delay = max(0.0, min(interval, c.deadline - time.monotonic()))

        def fire() -> None:
            c.timer = None
            try:
                if c.responded or c.abandoned or c.final is not None:
                    return
                if time.monotonic() >= c.deadline - 1e-3:
                    on_timeout(c)
                    return
                resend(c)
                self.arm(c, min(interval * 2, T2), resend, on_timeout)
            except Exception:  # noqa: BLE001 - a timer bug must not stop the loop
                self.counts["internal_errors"] += 1
                self.log.exception("sip_internal_error", where="retransmit timer")

        c.timer = loop.call_later(delay, fire)

    def abandon(self, c: ClientTransaction) -> None:
        """Give up on a client transaction (failed over, timed out): its timer stops, and late
        responses are still recognised for LINGER_S."""
        c.abandoned = True
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None
        c.expires = time.monotonic() + LINGER_S
