"""One endpoint's circuit breaker: after `failures` consecutive failed attempts (timeouts
included) the endpoint is left alone for `cooldown_s`, then one probe attempt is let through.

Why: an endpoint that hangs holds a delivery slot for the whole attempt timeout, every time
one of its chains is retried. While the breaker is open its chains wait in the outbox without
taking a slot, so a dead receiver costs the pool one probe per cool-down instead of a slot per
pending job. State is in memory only: after a restart an endpoint starts closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(str, Enum):
    CLOSED = "closed"  # attempts go out as their chains come due
    OPEN = "open"  # no attempts until retry_at
    HALF_OPEN = "half_open"  # one probe attempt is in flight; its result closes or reopens


@dataclass
class CircuitBreaker:
    failures: int
    cooldown_s: float
    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    retry_at: float = 0.0
    probe: Any = None  # the chain whose attempt is the probe

    def ready(self, now: float) -> bool:
        """May a new attempt start now?"""
        if self.state is BreakerState.CLOSED:
            return True
        return self.state is BreakerState.OPEN and now >= self.retry_at

    def start(self, chain: Any) -> None:
        """An attempt of `chain` starts (after `ready`): past an open breaker, it is the probe."""
        if self.state is BreakerState.OPEN:
            self.state, self.probe = BreakerState.HALF_OPEN, chain

    def record(self, ok: bool, now: float) -> None:
        if ok:
            self.state, self.consecutive_failures, self.probe = BreakerState.CLOSED, 0, None
            return
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN or (
                self.state is BreakerState.CLOSED and self.consecutive_failures >= self.failures):
            self.state, self.retry_at, self.probe = BreakerState.OPEN, now + self.cooldown_s, None

    def release(self, chain: Any, now: float) -> None:
        """`chain`'s task ended: a probe that never got to its attempt (shutdown, the endpoint
        disabled) must not leave the breaker half-open for good."""
        if self.state is BreakerState.HALF_OPEN and self.probe == chain:
            self.state, self.retry_at, self.probe = BreakerState.OPEN, now, None

    def reset(self, now: float) -> None:
        """The operator says the receiver is back (redeliver, a new URL): probe at once."""
        if self.state is BreakerState.OPEN:
            self.retry_at = now

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "consecutive_failures": self.consecutive_failures,
                "retry_at": self.retry_at if self.state is BreakerState.OPEN else None}
