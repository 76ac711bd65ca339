"""Opening a PostgreSQL database: the schema's migrations (migrations.py), then one connection pool
for the four stores (pool.py), and the errors.

Each store method runs as one transaction on a pooled connection, so its check and write never
interleave with another connection's, in this process or another node: the rows that decide (a
key, a token) are locked with SELECT ... FOR UPDATE, a reservation is taken by DELETE ... RETURNING.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from bridge.config import ConfigError
from bridge.stores.backend import StoreNotFound, Stores, StoreUnavailable
from bridge.stores.migrations import Migration, SchemaStatus
from bridge.stores.postgres import migrations
from bridge.stores.postgres.jobs import PgJobStore
from bridge.stores.postgres.keys import PgKeyStore
from bridge.stores.postgres.nodes import PgNodeStore
from bridge.stores.postgres.pool import Pool
from bridge.stores.postgres.webhooks import PgWebhookStore

__all__ = ["POOL_MAX_SIZE", "migrate", "open_stores", "schema_status", "where_of"]

POOL_MAX_SIZE = 10  # connections per opened URL (per node), shared by the four stores
CONNECT_TIMEOUT_S = 10
T = TypeVar("T")
POOL_WAIT_S = 5.0  # longest a store call waits for a pooled connection


def where_of(url: str) -> str:
    """host:port/dbname for messages: never the password. A URL libpq cannot parse is a
    configuration error, as an unknown scheme is."""
    try:
        p = conninfo_to_dict(url)
    except psycopg.ProgrammingError as e:
        raise ConfigError(f"storage.url is not a valid PostgreSQL URL: {e}") from None
    return f"{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p.get('dbname', p.get('user', ''))}"


def _reason(e: Exception) -> str:
    """The driver's message without libpq's indented hint lines."""
    return " ".join(line.strip() for line in str(e).splitlines() if line and not line[0].isspace()) or repr(e)


async def _on_connection(url: str, where: str, action: Callable[[psycopg.AsyncConnection, str], Awaitable[T]],
                         *, create: bool) -> T:
    """`action(conn, where)` on one direct connection (autocommit, dict rows), closed after: a
    wrong URL is one clear error now rather than a pool retrying in the background. A database
    that does not exist is StoreNotFound when the caller may not create (the database itself is
    the operator's to create, so with create=True it is StoreUnavailable naming it)."""
    try:
        conn = await psycopg.AsyncConnection.connect(url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True,
                                                     row_factory=dict_row)
    except psycopg.OperationalError as e:
        if not create and "does not exist" in str(e):
            raise StoreNotFound(where) from e
        raise StoreUnavailable(where, _reason(e)) from e
    async with conn:
        try:
            return await action(conn, where)
        except psycopg.Error as e:  # e.g. a migration the database refuses: one line, nothing applied
            raise StoreUnavailable(where, _reason(e)) from e


async def schema_status(url: str) -> SchemaStatus:
    return await _on_connection(url, where_of(url), migrations.status, create=False)


async def migrate(url: str) -> list[Migration]:
    return await _on_connection(url, where_of(url), migrations.apply, create=True)


async def open_stores(url: str, *, create: bool = True, migrate: bool = True) -> Stores:
    where = where_of(url)
    done = await _on_connection(url, where, lambda conn, w: migrations.apply(conn, w, create=create, migrate=migrate),
                                create=create)
    # `check`: a connection the server dropped (a restart, a failover) is found and replaced when it
    # is taken, not by the write it was taken for; `timeout`: a write waits at most POOL_WAIT_S for
    # a connection, then fails and is retried in the background (bridge/backlog.py), so a database
    # outage never holds a live call's events for the pool's default 30 s.
    pool = AsyncConnectionPool(url, min_size=1, max_size=POOL_MAX_SIZE, open=False, name=where,
                               timeout=POOL_WAIT_S, check=AsyncConnectionPool.check_connection,
                               kwargs={"autocommit": True, "row_factory": dict_row,
                                       "connect_timeout": CONNECT_TIMEOUT_S})
    try:
        await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
    except Exception as e:
        await pool.close()
        raise StoreUnavailable(where, _reason(e)) from e
    shared = Pool(pool, users=4)
    return Stores(jobs=PgJobStore(shared), keys=PgKeyStore(shared), webhooks=PgWebhookStore(shared),
                  nodes=PgNodeStore(shared), migrated=tuple((m.version, m.name) for m in done))
