"""What a storage backend provides: an opener that turns a URL into the four stores.

A backend is one module (or package) with an `open_stores(url, *, create)` coroutine of the
`Opener` shape, registered under its URL scheme in bridge/stores/registry.py. It owns every
connection it makes; `Stores.close()` releases them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bridge.stores.jobs import JobStore
from bridge.stores.keys import KeyStore
from bridge.stores.nodes import NodeStore
from bridge.stores.webhooks import WebhookStore

__all__ = ["Opener", "StoreNotFound", "StoreUnavailable", "Stores"]


@dataclass(frozen=True)
class Stores:
    """The service's persistence, all from one URL."""

    jobs: JobStore
    keys: KeyStore
    webhooks: WebhookStore
    nodes: NodeStore  # the cluster's nodes and every node's live sessions (docs/cluster.md)

    async def close(self) -> None:
        for store in (self.nodes, self.webhooks, self.keys, self.jobs):
            await store.close()


class StoreNotFound(LookupError):
    """Opened with `create=False` and nothing is there (a CLI pointed at the wrong place must
    not start an empty database). `where` names it for the message (a path, a host/db)."""

    def __init__(self, where: str) -> None:
        super().__init__(f"no database at {where}")
        self.where = where


class StoreUnavailable(Exception):
    """The database exists but cannot be used (not a database, refused connection); the
    backend's own error is the __cause__."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"cannot open {where}: {reason}")
        self.where = where
        self.reason = reason


# (url, create) -> the opened stores. `create=False`: raise StoreNotFound rather than create.
Opener = Callable[..., Awaitable[Stores]]
