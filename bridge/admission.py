"""Admission by capacity: a new session is refused while the decode pool could not keep it on time.

Every leg of every call shares one decode pool (bridge/recognizer/pool.py). Past its capacity
nothing fails: finals queue behind each other and every call's captions fall late together,
with nobody told. So a session's legs are admitted only while

1. the live legs plus its own stay within the leg cap: `capacity.max_legs` if set, else decode
   contexts x legs per context, where legs per context is `capacity.legs_per_context` if set,
   else follows the measured decode speed (below), and
2. the pool is keeping finals on time right now: the p95 of the finals' time in the pool (queue
   wait + decode) over the last `window_s`, and the age of the oldest final still waiting, are
   both under `max_final_latency_s`. This catches what a fixed count cannot: longer
   utterances, a slower CPU, other work on the machine. It is evidence only while legs are live
   (an idle node has nothing to keep on time, and refusing there would refuse for `window_s`
   after one slow final) and, for the p95, with at least `min_finals` finals in the window (one
   long utterance is not a trend).

The speed-following cap is what protects a burst: sessions offered within seconds of each other
arrive before any of them has produced a final, so the latency rule has no evidence yet. The
pool times a calibration clip on every context at start and then measures its finals (decode
seconds per second of final audio over `window_s`: bridge/recognizer/pool.py). A live leg
needs about `speech_share` seconds of audio decoded as finals per second, so one context can
carry `final_share / (speed x speech_share)` legs while spending `final_share` of its time on
finals; the rest absorbs partials, the event loop's and the callers' share of the CPU, and the
burstiness of finals (sentences end together). The default 0.3 is what kept the finals' time in
the pool at the 1.2 s bound in `python -m bench.capacity --offer 32` on the 2-core reference
machine (0.15 decode s per audio s: 2 legs per context; docs/benchmarks.md, "Admission"); at
0.075, that machine on a fast day, it is 5. A slower or busier box thus admits fewer legs, and
the cap follows it while calls run.

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
from bridge.recognizer.pool import FinalTiming

__all__ = ["Admission", "CapacityRefused", "Headroom", "Reservation", "legs_per_context"]

# Without a measured speed (a pool that was never calibrated), the count measured on the
# reference machine's fast day (docs/benchmarks.md, "Capacity").
UNMEASURED_LEGS_PER_CONTEXT = 8

log = get_logger("bridge.admission")


def legs_per_context(speed: float | None, cfg: CapacityConfig) -> int:
    """Legs one context keeps on time at `speed` decode seconds per audio second (at least 1:
    a node that admits nothing is down, which /healthz says otherwise)."""
    if not speed or speed <= 0:
        return UNMEASURED_LEGS_PER_CONTEXT
    return max(1, int(cfg.final_share / (speed * cfg.speech_share)))


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
    legs_per_context: int
    cap_source: str  # "max_legs", "legs_per_context" (both configured) or "decode speed" (measured)
    decode_s_per_audio_s: float | None  # the speed the cap follows (pool: calibration, then finals)
    speed_source: str
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
        return self._cap(self.pool.final_timing(self.cfg.window_s))[0]

    def _cap(self, t: FinalTiming) -> tuple[int, int, str]:
        """(leg cap, legs per context, where the cap comes from)."""
        per = self.cfg.legs_per_context or legs_per_context(t.decode_s_per_audio_s, self.cfg)
        if self.cfg.max_legs:
            return self.cfg.max_legs, per, "max_legs"
        return self.pool.size * per, per, "legs_per_context" if self.cfg.legs_per_context else "decode speed"

    def headroom(self, legs: int = 1) -> Headroom:
        live, bound = self._live_legs(), self.cfg.max_final_latency_s
        t = self.pool.final_timing(self.cfg.window_s)
        cap, per, source = self._cap(t)
        busy = live + self._reserved > 0  # an idle node always admits: nothing live to keep on time
        why: str | None = None
        if live + self._reserved + legs > cap:
            why = (f"at capacity: {live + self._reserved} of {cap} recognizer legs in use, this session needs "
                   f"{legs}")
            if source == "decode speed" and t.decode_s_per_audio_s is not None:
                why += f" (cap from the decode speed, {t.decode_s_per_audio_s:.3f} s per audio s)"
        elif busy and t.oldest_waiting_s > bound:
            why = (f"the recognizer is behind: a final has waited {t.oldest_waiting_s:.1f} s "
                   f"(bound {bound:g} s)")
        elif (busy and t.finals >= self.cfg.min_finals and t.latency_p95_s is not None
              and t.latency_p95_s > bound):
            why = (f"the recognizer is behind: finals took {t.latency_p95_s:.1f} s (p95 over the last "
                   f"{t.window_s:g} s; bound {bound:g} s)")
        return Headroom(cap, per, source, t.decode_s_per_audio_s, t.speed_source, live, self._reserved, t.latency_p95_s, t.finals, t.oldest_waiting_s, t.utilization,
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
