"""The PostgreSQL backend (`postgresql://user@host:port/dbname`, also `postgres://`): jobs, keys and
the webhook outbox in one database, on psycopg 3's async driver with one connection pool shared
by the three stores (db.py).

psycopg is an optional dependency (`pip install 'callbridge[postgres]'`), so the driver is
imported when a postgresql:// URL is opened, not when the registry is: an embedded (SQLite)
install must not need it.
"""

from __future__ import annotations

from types import ModuleType

from bridge.config import ConfigError
from bridge.stores.backend import Stores
from bridge.stores.migrations import Migration, SchemaStatus

__all__ = ["SCHEMES", "migrate", "open_stores", "schema_status"]

SCHEMES = ("postgresql", "postgres")  # libpq accepts both URI prefixes


def _db() -> ModuleType:
    try:
        from bridge.stores.postgres import db  # optional driver: see the module docstring
    except ImportError as e:
        raise ConfigError(f"storage.url {SCHEMES[0]}:// needs the psycopg driver: "
                          f"pip install 'callbridge[postgres]' ({e})") from e
    return db


async def open_stores(url: str, *, create: bool = True, migrate: bool = True) -> Stores:
    return await _db().open_stores(url, create=create, migrate=migrate)


async def schema_status(url: str) -> SchemaStatus:
    return await _db().schema_status(url)


async def migrate(url: str) -> list[Migration]:
    return await _db().migrate(url)
