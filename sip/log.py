"""Logging for the dispatcher's parts: a structlog logger (injected by the service, which binds
its own context; structlog's default otherwise) and a rate limit on warnings about peers' traffic.

The SIP package stands alone: it uses structlog as a plain dependency and imports nothing from
the service (`bridge`), which passes its logger in.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

__all__ = ["WarningLimiter", "component_logger"]


def component_logger(logger: Any, component: str, name: str = "callbridge.sip") -> Any:
    """`logger` (or the structlog logger `name` when None) bound to `component`."""
    base = logger if logger is not None else structlog.stdlib.get_logger(name)
    return base.bind(component=component) if hasattr(base, "bind") else base


class WarningLimiter:
    """Warnings about peers' traffic, at most `per_second` a second (a flood must not flood the
    log); the next one logged says how many were suppressed before it."""

    def __init__(self, log: Any, per_second: int = 20) -> None:
        self.log = log
        self.per_second = per_second
        self._window = (0, 0, 0)  # (second, logged this second, suppressed)

    def __call__(self, event: str, **kw: Any) -> None:
        sec = int(time.monotonic())
        window, logged, suppressed = self._window
        if sec != window:
            window, logged = sec, 0
        if logged >= self.per_second:
            self._window = (window, logged, suppressed + 1)
            return
        if suppressed:
            kw["suppressed_before"] = suppressed
        self._window = (window, logged + 1, 0)
        self.log.warning(event, **kw)
