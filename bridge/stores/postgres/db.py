"""Opening a PostgreSQL database: one connection pool for the four stores (pool.py), the schema,
and the errors.

Each store method runs as one transaction on a pooled connection, so its check and write never
interleave with another connection's, in this process or another node: the rows that decide (a
key, a token) are locked with SELECT ... FOR UPDATE, a reservation is taken by DELETE ... RETURNING.

The schema is created at open (`create=True`) with CREATE ... IF NOT EXISTS under an advisory
lock (two nodes starting at once), and `schema_version` records version 1: a versioned
migration system starts from there.
"""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from bridge.config import ConfigError
from bridge.stores.backend import StoreNotFound, Stores, StoreUnavailable
from bridge.stores.postgres.jobs import SCHEMA as JOBS_SCHEMA
from bridge.stores.postgres.jobs import PgJobStore
from bridge.stores.postgres.keys import SCHEMA as KEYS_SCHEMA
from bridge.stores.postgres.keys import PgKeyStore
from bridge.stores.postgres.nodes import SCHEMA as NODES_SCHEMA
from bridge.stores.postgres.nodes import PgNodeStore
from bridge.stores.postgres.pool import Pool
from bridge.stores.postgres.webhooks import SCHEMA as WEBHOOKS_SCHEMA
from bridge.stores.postgres.webhooks import PgWebhookStore

__all__ = ["POOL_MAX_SIZE", "SCHEMA_VERSION", "open_stores", "where_of"]

SCHEMA_VERSION = 1
POOL_MAX_SIZE = 10  # connections per opened URL (per node), shared by the three stores
CONNECT_TIMEOUT_S = 10

_VERSION_SCHEMA = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
_SCHEMA_LOCK = 0x63616C6C  # pg_advisory_xact_lock key: one node creates the schema at a time


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


async def _probe(url: str, where: str, create: bool) -> None:
    """One direct connection first, so a wrong URL is one clear error now rather than a pool
    retrying in the background; and, with create=False, the schema must already be there."""
    try:
        conn = await psycopg.AsyncConnection.connect(url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True)
    except psycopg.OperationalError as e:
        if not create and "does not exist" in str(e):
            raise StoreNotFound(where) from e
        raise StoreUnavailable(where, _reason(e)) from e
    async with conn, conn.transaction():
        if create:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        if (await (await conn.execute("SELECT to_regclass('schema_version')")).fetchone())[0] is not None:
            row = await (await conn.execute("SELECT MAX(version) FROM schema_version")).fetchone()
            if row[0] is not None and row[0] > SCHEMA_VERSION:  # checked before touching any table
                raise StoreUnavailable(where, f"database schema v{row[0]} is newer than this code "
                                              f"(v{SCHEMA_VERSION})")
        elif not create:
            raise StoreNotFound(where)
        if create:
            for schema in (_VERSION_SCHEMA, JOBS_SCHEMA, KEYS_SCHEMA, WEBHOOKS_SCHEMA, NODES_SCHEMA):
                for stmt in schema.split(";"):
                    if stmt.strip():
                        await conn.execute(stmt)
            if await (await conn.execute("SELECT 1 FROM schema_version")).fetchone() is None:
                await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))


async def open_stores(url: str, *, create: bool = True) -> Stores:
    where = where_of(url)
    await _probe(url, where, create)
    pool = AsyncConnectionPool(url, min_size=1, max_size=POOL_MAX_SIZE, open=False, name=where,
                               kwargs={"autocommit": True, "row_factory": dict_row,
                                       "connect_timeout": CONNECT_TIMEOUT_S})
    try:
        await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
    except Exception as e:
        await pool.close()
        raise StoreUnavailable(where, _reason(e)) from e
    shared = Pool(pool, users=4)
    return Stores(jobs=PgJobStore(shared), keys=PgKeyStore(shared), webhooks=PgWebhookStore(shared),
                  nodes=PgNodeStore(shared))
