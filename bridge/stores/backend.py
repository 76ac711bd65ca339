"""What a storage backend provides: an opener that turns a URL into the four stores.

A backend is one module (or package), registered under its URL scheme in
bridge/stores/registry.py, with three coroutines: `open_stores(url, *, create, migrate)` of the
`Opener` shape (it applies the schema's migrations before the stores open), and, for
`callbridge db`, `schema_status(url)` and `migrate(url)` (bridge/stores/migrations.py). It owns
every connection it makes; `Stores.close()` releases them.
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
    migrated: tuple[tuple[int, str], ...] = ()  # (version, name) of the migrations this opening applied

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


# (url, *, create, migrate) -> the opened stores, schema migrated. `create=False`: an empty
# database is StoreNotFound; `migrate=False`: one behind this code is SchemaOutdated
# (bridge/stores/migrations.py).
Opener = Callable[..., Awaitable[Stores]]
