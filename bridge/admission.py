"""Admission by capacity: a new session is refused while the decode pool could not keep it on time.

Every leg of every call shares one decode pool (bridge/recognizer/pool.py). Past its capacity
nothing fails: finals queue behind each other and every call's captions fall late together,
with nobody told. So a session's legs are admitted only while

1. the live legs plus its own stay within `capacity.max_legs` (default: decode contexts x
   `legs_per_context`, the count `python -m bench.capacity` measures finals on time), and
2. the pool is keeping finals on time right now: the p95 of the finals' time in the pool (queue
   wait + decode) over the last `window_s`, and the age of the oldest final still waiting, are
   both under `max_final_latency_s`. This catches what a fixed count cannot: longer
   utterances, a slower CPU, other work on the machine. It is evidence only while legs are live
   (an idle node has nothing to keep on time, and refusing there would refuse for `window_s`
   after one slow final) and, for the p95, with at least `min_finals` finals in the window (one
   long utterance is not a trend).

Finals are the load that cannot be shed (partials are superseded or dropped under load), so
they are what is measured. A refusal names its reason and carries `retry_after_s`; each
ingress turns it into its own answer (stream: `error` RATE_LIMITED; WebRTC: HTTP 503; SIP: 503),
all with Retry-After. Legs being opened hold a `Reservation` until their call is registered
(a SIP INVITE holds one until its worker reports the call started, or the INVITE fails:
sip/dispatcher.py), so concurrent opens cannot overshoot between the check and the registration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from bridge.config import CapacityConfig
from bridge.logs import get_logger

__all__ = ["Admission", "CapacityRefused", "Headroom", "Reservation"]

log = get_logger("bridge.admission")


class CapacityRefused(Exception):
    """No room for a session's legs; `retry_after_s` is what the refusal tells the client."""

    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Headroom:
    """Capacity as of now, for /healthz and /metrics."""

    legs_capacity: int
    legs_live: int
    legs_reserved: int
    final_latency_p95_s: float | None  # None: no final decoded within the window
    finals_in_window: int  # the p95 refuses only from capacity.min_finals on
    oldest_final_wait_s: float
    final_utilization: float
    max_final_latency_s: float
    window_s: float
    refusing: str | None  # why one more leg would be refused now; None while admitting

    @property
    def legs_free(self) -> int:
        return max(0, self.legs_capacity - self.legs_live - self.legs_reserved)

    @property
    def admitting(self) -> bool:
        return self.refusing is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["legs_free"] = self.legs_free
        d["admitting"] = self.admitting
        return d


class Reservation:
    """Legs held for a session being opened; release once its call is registered (or failed)."""

    def __init__(self, admission: "Admission", legs: int) -> None:
        self._admission = admission
        self.legs = legs

    def release(self) -> None:
        if self.legs:
            self._admission._reserved -= self.legs
            self.legs = 0


class Admission:
    """The capacity model of one service. Event-loop only (the check and the hold are one step)."""

    def __init__(self, cfg: CapacityConfig, pool: Any, live_legs: Callable[[], int]) -> None:
        self.cfg = cfg
        self.pool = pool
        self._live_legs = live_legs
        self._reserved = 0

    @property
    def legs_capacity(self) -> int:
        return self.cfg.max_legs or self.pool.size * self.cfg.legs_per_context

    def headroom(self, legs: int = 1) -> Headroom:
        live, cap, bound = self._live_legs(), self.legs_capacity, self.cfg.max_final_latency_s
        t = self.pool.final_timing(self.cfg.window_s)
        busy = live + self._reserved > 0  # an idle node always admits: nothing live to keep on time
        why: str | None = None
        if live + self._reserved + legs > cap:
            why = (f"at capacity: {live + self._reserved} of {cap} recognizer legs in use, this session needs "
                   f"{legs}")
        elif busy and t.oldest_waiting_s > bound:
            why = (f"the recognizer is behind: a final has waited {t.oldest_waiting_s:.1f} s "
                   f"(bound {bound:g} s)")
        elif (busy and t.finals >= self.cfg.min_finals and t.latency_p95_s is not None
              and t.latency_p95_s > bound):
            why = (f"the recognizer is behind: finals took {t.latency_p95_s:.1f} s (p95 over the last "
                   f"{t.window_s:g} s; bound {bound:g} s)")
        return Headroom(cap, live, self._reserved, t.latency_p95_s, t.finals, t.oldest_waiting_s, t.utilization,
                        bound, t.window_s, why)

    def refusal(self, legs: int) -> CapacityRefused | None:
        """Why `legs` more legs cannot be admitted now, or None (then logged: the caller refuses)."""
        why = self.headroom(legs).refusing
        if why is None:
            return None
        log.info("capacity_refused", legs=legs, reason=why)
        return CapacityRefused(why + "; retry later or on another node", self.cfg.retry_after_s)

    def reserve(self, legs: int) -> Reservation:
        """Hold `legs` for a session being opened, or raise CapacityRefused."""
        refused = self.refusal(legs)
        if refused is not None:
            raise refused
        self._reserved += legs
        return Reservation(self, legs)
