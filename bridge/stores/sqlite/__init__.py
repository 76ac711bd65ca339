"""The embedded SQLite backend (`sqlite://PATH`), the default: one file holds jobs, keys, the
webhook outbox and the node rows, each store on its own connection (WAL, BEGIN IMMEDIATE: see db.py).

URL: `sqlite://` followed by the file's path, taken literally (no percent-decoding, so any data
directory works), absolute (`sqlite:///var/lib/callbridge/callbridge.db`) or relative to the
working directory (`sqlite://data/callbridge.db`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from bridge.config import ConfigError
from bridge.stores.backend import StoreNotFound, Stores, StoreUnavailable
from bridge.stores.sqlite.jobs import SqliteJobStore
from bridge.stores.sqlite.keys import SqliteKeyStore
from bridge.stores.sqlite.nodes import SqliteNodeStore
from bridge.stores.sqlite.threaded import ThreadedJobStore, ThreadedKeyStore, ThreadedNodeStore, ThreadedWebhookStore
from bridge.stores.sqlite.webhooks import SqliteWebhookStore

__all__ = ["SCHEME", "open_stores", "path_of", "url_for"]

SCHEME = "sqlite"
_PREFIX = SCHEME + "://"


def url_for(path: str | Path) -> str:
    """The URL of a database file (absolute paths give `sqlite:///...`)."""
    return _PREFIX + str(path)


def path_of(url: str) -> Path:
    """The file a `sqlite://` URL names; ConfigError for an empty or in-memory one (three stores
    on three connections would each get a different in-memory database)."""
    if not url.startswith(_PREFIX):
        raise ConfigError(f"storage.url: not a {SCHEME} URL: {url!r}")
    rest = url[len(_PREFIX):]
    if not rest or rest == ":memory:":
        raise ConfigError(f"storage.url {url!r} must name a database file: "
                          "sqlite:///ABSOLUTE/PATH or sqlite://RELATIVE/PATH")
    return Path(rest)


async def open_stores(url: str, *, create: bool = True) -> Stores:
    path = path_of(url)
    if not create and not path.is_file():
        raise StoreNotFound(str(path))
    return await asyncio.to_thread(_open, path)


def _open(path: Path) -> Stores:
    opened: list[SqliteJobStore | SqliteKeyStore | SqliteWebhookStore | SqliteNodeStore] = []
    try:
        opened.append(jobs := SqliteJobStore(path))
        opened.append(keys := SqliteKeyStore(str(path)))
        opened.append(hooks := SqliteWebhookStore(path))
        opened.append(nodes := SqliteNodeStore(path))
    except BaseException as e:
        for store in opened:
            store.close()
        if isinstance(e, sqlite3.DatabaseError):
            raise StoreUnavailable(str(path), str(e)) from e
        raise
    return Stores(jobs=ThreadedJobStore(jobs), keys=ThreadedKeyStore(keys), webhooks=ThreadedWebhookStore(hooks),
                  nodes=ThreadedNodeStore(nodes))
