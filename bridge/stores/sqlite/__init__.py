"""The embedded SQLite backend (`sqlite://PATH`), the default: one file holds jobs, keys, the
webhook outbox and the node rows, each store on its own connection (WAL, BEGIN IMMEDIATE: see db.py). Opening
applies the schema's migrations first (migrations.py), once, on a connection of its own.

URL: `sqlite://` followed by the file's path, taken literally (no percent-decoding, so any data
directory works), absolute (`sqlite:///var/lib/callbridge/callbridge.db`) or relative to the
working directory (`sqlite://data/callbridge.db`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bridge.config import ConfigError
from bridge.stores.backend import StoreNotFound, Stores, StoreUnavailable
from bridge.stores.migrations import Migration, SchemaStatus
from bridge.stores.sqlite import migrations
from bridge.stores.sqlite.db import connect
from bridge.stores.sqlite.jobs import SqliteJobStore
from bridge.stores.sqlite.keys import SqliteKeyStore
from bridge.stores.sqlite.nodes import SqliteNodeStore
from bridge.stores.sqlite.threaded import ThreadedJobStore, ThreadedKeyStore, ThreadedNodeStore, ThreadedWebhookStore
from bridge.stores.sqlite.webhooks import SqliteWebhookStore

__all__ = ["SCHEME", "migrate", "open_stores", "path_of", "schema_status", "url_for"]

SCHEME = "sqlite"
T = TypeVar("T")
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


async def open_stores(url: str, *, create: bool = True, migrate: bool = True) -> Stores:
    path = path_of(url)
    if not create and not path.is_file():
        raise StoreNotFound(str(path))
    return await asyncio.to_thread(_open, path, create, migrate)


async def schema_status(url: str) -> SchemaStatus:
    path = path_of(url)
    if not path.is_file():
        raise StoreNotFound(str(path))
    return await asyncio.to_thread(_on_connection, path, migrations.status)


async def migrate(url: str) -> list[Migration]:
    return await asyncio.to_thread(_on_connection, path_of(url), migrations.apply)


def _on_connection(path: Path, action: Callable[[sqlite3.Connection, str], T]) -> T:
    """`action(db, where)` on a connection of its own, closed after; a file that is not a
    database is StoreUnavailable."""
    try:
        db = connect(str(path))
    except sqlite3.DatabaseError as e:
        raise StoreUnavailable(str(path), str(e)) from e
    try:
        return action(db, str(path))
    except sqlite3.DatabaseError as e:
        raise StoreUnavailable(str(path), str(e)) from e
    finally:
        db.close()


def _open(path: Path, create: bool, migrate: bool) -> Stores:
    # Migrated here, once, before any store opens; each store's own check then finds it current.
    done = _on_connection(path, lambda db, where: migrations.apply(db, where, create=create, migrate=migrate))
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
                  nodes=ThreadedNodeStore(nodes), migrated=tuple((m.version, m.name) for m in done))
