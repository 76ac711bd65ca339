"""Per-source backoff after failed authentication, so credentials cannot be guessed at line rate.

A source (an IPv4 address, or the /64 of an IPv6 address, since one host holds a whole /64) may
fail `failures_before_backoff` times within `failure_window_s`; the next failure blocks it for
`backoff_initial_s`, and each further block that follows within a window of the last one doubles,
up to `backoff_max_s`. While blocked, every request from the source that needs a credential is
refused with 429 before its credential is looked at: checking it would tell a guesser which guess
was right, which is what the block is there to prevent. So a valid key is refused from a blocked
source until the block ends (at most `backoff_max_s`), and works from any other source at all
times. A success does not clear the record: otherwise one's own valid key, sent between guesses,
would reset the count. A source quiet for a window after its last block starts afresh.

Only refusals of a presented credential count (unknown key, bad JWT, expired, reused, revoked);
a request with no credential, or a temporary token sent where tokens are not accepted, guesses
nothing. State is in memory, per process, bounded to `MAX_SOURCES` (least recently seen dropped).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.config import AuthConfig

__all__ = ["COUNTED_CODES", "MAX_SOURCES", "AuthBackoff", "source_of"]

# AuthError codes that mean a credential was presented and refused (see the module docstring)
COUNTED_CODES = frozenset({"INVALID_CREDENTIALS", "TOKEN_EXPIRED", "TOKEN_REUSED", "KEY_REVOKED"})
MAX_SOURCES = 65536


def source_of(remote: str | None) -> str:
    """The backoff key of a peer address: the IPv4 address, the /64 of an IPv6 one (an IPv4-mapped
    IPv6 address counts as its IPv4 address)."""
    if not remote:
        return "unknown"
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return remote
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Source:
    failures: deque[float] = field(default_factory=deque)  # times of recent counted failures
    strikes: int = 0  # blocks so far in this run of failures
    blocked_until: float = 0.0
    last: float = 0.0  # last failure or end of the last block


class AuthBackoff:
    """Failure counts and blocks per source. Event-loop only (no locking); `clock` is injectable
    so tests move time instead of waiting."""

    def __init__(self, config: AuthConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        """`failures_before_backoff = 0` turns it off."""
        self.limit = int(config.failures_before_backoff)
        self.window = float(config.failure_window_s)
        self.initial = float(config.backoff_initial_s)
        self.maximum = float(config.backoff_max_s)
        self.clock = clock
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def retry_after(self, source: str) -> int:
        """Whole seconds until `source` may try again; 0 when it is not blocked."""
        s = self._sources.get(source)
        if s is None:
            return 0
        left = s.blocked_until - self.clock()
        return math.ceil(left) if left > 0 else 0

    def failed(self, source: str) -> int:
        """Record a refused credential from `source`; returns the seconds of the block this
        failure started, or 0 when it started none."""
        if not self.enabled:
            return 0
        now = self.clock()
        s = self._sources.pop(source, None) or _Source()
        self._sources[source] = s  # most recently seen last
        while len(self._sources) > MAX_SOURCES:
            self._sources.popitem(last=False)
        if s.strikes and now - max(s.last, s.blocked_until) > self.window:
            s.strikes = 0  # quiet for a window after its last block: a fresh start
        s.last = now
        while s.failures and s.failures[0] <= now - self.window:
            s.failures.popleft()
        s.failures.append(now)
        if len(s.failures) < self.limit:
            return 0
        s.failures.clear()
        s.strikes += 1
        period = min(self.initial * 2 ** min(s.strikes - 1, 62), self.maximum)
        s.blocked_until = now + period
        return math.ceil(period)
