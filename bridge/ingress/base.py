"""What the service needs from an ingress (one way calls come in): its source name, whether the
config turns it on, its HTTP routes, and a lifecycle it can run for every ingress alike.

An ingress speaks its transport only; admission, the job, credits and the wire frames are the
session layer's (bridge/sessions/). Adding one is one module implementing `Ingress` plus one
entry in bridge/ingress/registry.py, with its source name in `JobSource` (bridge/jobs/model.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from aiohttp import web

from bridge.config import Config
from bridge.jobs.model import JobSource

if TYPE_CHECKING:
    from bridge.service import Service

__all__ = ["Ingress", "Unavailable"]

Unavailable = tuple[str, str]  # (why an enabled ingress cannot run here, what to do about it)


class Ingress(Protocol):
    """One way in. The class says whether it runs (`enabled`, `unavailable`) and what it serves
    (`routes`, registered whether or not it runs, so a disabled one can say so); an instance,
    built with the service once its session layer exists, is started, drained and stopped with it."""

    source: ClassVar[JobSource]

    def __init__(self, service: "Service") -> None: ...

    @staticmethod
    def enabled(config: Config) -> bool:
        """The config turns it on."""
        ...

    @staticmethod
    def unavailable() -> Unavailable | None:
        """Why it cannot run on this machine although enabled (a missing library), or None."""
        ...

    @staticmethod
    def routes() -> list[web.RouteDef]:
        """Its HTTP routes; their handlers find the running instance with `Service.ingress(source)`."""
        ...

    async def start(self) -> None:
        """Listen; raises if it cannot (the service does not start)."""
        ...

    async def drain(self, timeout_s: float) -> None:
        """No new sessions; ask live ones to end (their jobs saved). The call registry's drain then
        waits for every live call, whatever its ingress."""
        ...

    async def stop(self) -> None:
        """Release what it holds (sockets, processes); after the drain."""
        ...

    def stats(self) -> dict[str, Any]:
        """Its live state for /healthz and /metrics."""
        ...
