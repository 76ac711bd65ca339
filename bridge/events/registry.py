"""Event buses by URL scheme: `bus.url` picks one; empty (or memory://) is the in-process bus.

Adding a bus: its module (an EventBus), one opener here, and its scheme in
bridge.config.BUS_SCHEMES (the config layer refuses unknown schemes before anything starts; a
test keeps the two lists equal). The Redis client is an optional dependency
(`pip install 'callbridge[cluster]'`), so its module is imported when a redis:// URL is opened,
not when this registry is: an embedded install must not need it (as bridge/stores/postgres does).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .bus import EventBus, InProcessBus

__all__ = ["BUSES", "BusConfigError", "open_bus"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class BusConfigError(ValueError):
    """bus.url names no bus this install can open."""


def _memory(url: str, *, node_id: str, max_buffer: int) -> EventBus:
    return InProcessBus(node_id=node_id)


def _redis(url: str, *, node_id: str, max_buffer: int) -> EventBus:
    try:
        from .redisbus import RedisBus  # optional client: see the module docstring
    except ImportError as e:
        raise BusConfigError(f"bus.url redis:// needs the redis client: pip install 'callbridge[cluster]' ({e})") from e
    return RedisBus(url, node_id=node_id, max_buffer=max_buffer)


BUSES: dict[str, Callable[..., EventBus]] = {"memory": _memory, "redis": _redis, "rediss": _redis}


def open_bus(url: str, *, node_id: str = "", max_buffer: int = 100_000) -> EventBus:
    """The bus `url` names (not connected yet: `await bus.start()`)."""
    if not url:
        return _memory(url, node_id=node_id, max_buffer=max_buffer)
    m = _SCHEME.match(url)
    opener = BUSES.get(m.group(1).lower()) if m else None
    if opener is None:
        raise BusConfigError(f"bus.url must be memory:// or redis://HOST:PORT/DB (rediss:// for TLS), got "
                             f"scheme {m.group(1) if m else url!r}")
    return opener(url, node_id=node_id, max_buffer=max_buffer)
