"""The PostgreSQL schema, as its migrations, and the runner that applies them (the only place the
PostgreSQL tables are defined; bridge/stores/migrations.py says how versions work). Tables mirror
bridge/stores/sqlite/migrations.py: JSON columns stay TEXT so both backends round-trip them the
same way, times are epoch seconds in DOUBLE PRECISION, segment and delivery ids are identity
columns, and text keys use the "C" collation so listings order and page exactly as SQLite's
byte-wise comparison does, whatever the database's locale.

Each pending migration runs in its own transaction under a transaction-level advisory lock, and
re-reads the version once it holds it, so of several nodes starting at once one applies it and the
others find it recorded. PostgreSQL's DDL is transactional: a failed migration leaves nothing.
"""

from __future__ import annotations

import time
from typing import Any

from bridge.stores.migrations import Migration, SchemaStatus, SchemaTooNew, check_sequence, status_of, to_apply

__all__ = ["LATEST", "LOCK", "MIGRATIONS", "apply", "status"]

LOCK = 0x63616C6C  # pg_advisory_xact_lock key: one node changes the schema at a time

# Version 1: the schema of the release at commit 8497f87, as it created it.
_V1 = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT COLLATE "C" PRIMARY KEY,
    owner TEXT COLLATE "C" NOT NULL,
    status TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION,
    duration_s DOUBLE PRECISION NOT NULL DEFAULT 0,
    config TEXT NOT NULL DEFAULT '{}',
    speakers TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}',
    audio_path TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS jobs_owner_created ON jobs (owner, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE TABLE IF NOT EXISTS segments (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id TEXT COLLATE "C" NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    channel INTEGER NOT NULL,
    speaker TEXT NOT NULL,
    start DOUBLE PRECISION NOT NULL,
    "end" DOUBLE PRECISION NOT NULL,
    text TEXT NOT NULL,
    words TEXT NOT NULL DEFAULT '[]',
    speech_final BOOLEAN NOT NULL,
    language TEXT,
    confidence DOUBLE PRECISION,
    original_text TEXT,
    original_speaker TEXT,
    edited_at DOUBLE PRECISION,
    UNIQUE (job_id, seq)
);
CREATE INDEX IF NOT EXISTS segments_job_order ON segments (job_id, start, channel, seq);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT COLLATE "C" PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    name TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION,
    balance BIGINT
);
CREATE TABLE IF NOT EXISTS temp_tokens (
    token_hash TEXT PRIMARY KEY,
    key_id TEXT COLLATE "C" NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    used_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS temp_tokens_expires ON temp_tokens (expires_at);
CREATE TABLE IF NOT EXISTS credit_reservations (
    job_id TEXT COLLATE "C" PRIMARY KEY,
    owner TEXT COLLATE "C" NOT NULL,
    credits BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS credit_reservations_owner ON credit_reservations (owner);
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id TEXT COLLATE "C" PRIMARY KEY,
    owner TEXT COLLATE "C" NOT NULL,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    events TEXT NOT NULL,
    sources TEXT NOT NULL DEFAULT '[]',
    description TEXT NOT NULL DEFAULT '',
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    managed_by TEXT NOT NULL DEFAULT 'api',
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_endpoints_owner ON webhook_endpoints (owner, created_at);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id TEXT COLLATE "C" NOT NULL REFERENCES webhook_endpoints(id) ON DELETE CASCADE,
    job_id TEXT COLLATE "C" NOT NULL,
    event_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    last_attempt_at DOUBLE PRECISION,
    last_status INTEGER,
    last_error TEXT,
    delivered_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_chain ON webhook_deliveries (status, endpoint_id, job_id, id);
CREATE INDEX IF NOT EXISTS webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id);
CREATE INDEX IF NOT EXISTS webhook_deliveries_job ON webhook_deliveries (job_id, endpoint_id, id);
"""

# Version 2: what several nodes sharing one database need (docs/cluster.md): node heartbeats, the
# node owning each job and live session, and leases on outbox rows.
_V2 = """
CREATE TABLE nodes (id TEXT COLLATE "C" PRIMARY KEY, url TEXT NOT NULL DEFAULT '',
                    started_at DOUBLE PRECISION NOT NULL, heartbeat_at DOUBLE PRECISION NOT NULL,
                    draining BOOLEAN NOT NULL DEFAULT FALSE);
ALTER TABLE jobs ADD COLUMN node_id TEXT COLLATE "C" NOT NULL DEFAULT '';
CREATE INDEX jobs_status_node ON jobs (status, node_id);
CREATE TABLE live_sessions (job_id TEXT COLLATE "C" PRIMARY KEY, owner TEXT COLLATE "C" NOT NULL,
                            node_id TEXT COLLATE "C" NOT NULL, started_at DOUBLE PRECISION NOT NULL);
CREATE INDEX live_sessions_owner ON live_sessions (owner);
CREATE INDEX live_sessions_node ON live_sessions (node_id);
ALTER TABLE webhook_deliveries ADD COLUMN lease_node TEXT COLLATE "C";
ALTER TABLE webhook_deliveries ADD COLUMN lease_until DOUBLE PRECISION;
CREATE INDEX webhook_deliveries_leased ON webhook_deliveries (endpoint_id, job_id) WHERE lease_node IS NOT NULL;
"""

MIGRATIONS = check_sequence([
    Migration(1, "initial", _V1),
    Migration(2, "cluster", _V2),
])
LATEST = MIGRATIONS[-1].version

_VERSION_TABLE = ("CREATE TABLE IF NOT EXISTS schema_version "
                  "(version INTEGER NOT NULL, name TEXT NOT NULL DEFAULT '', applied_at DOUBLE PRECISION)")


async def status(conn: Any, where: str) -> SchemaStatus:
    """Read-only: the schema's state (no schema_version table: version 0). `conn`: a psycopg
    AsyncConnection with dict rows."""
    exists = await (await conn.execute("SELECT to_regclass('schema_version') AS t")).fetchone()
    if exists["t"] is None:
        return status_of("postgresql", where, [], MIGRATIONS)
    rows = await (await conn.execute("SELECT * FROM schema_version")).fetchall()
    return status_of("postgresql", where, rows, MIGRATIONS)


async def apply(conn: Any, where: str, *, create: bool = True, migrate: bool = True) -> list[Migration]:
    """Bring the database to LATEST (see bridge.stores.migrations.to_apply for `create` and
    `migrate`) on an autocommit connection with dict rows; returns the migrations this call
    applied. Up to date costs two reads and takes no lock."""
    done = []
    for m in to_apply(await status(conn, where), create=create, migrate=migrate):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
            now = await status(conn, where)  # READ COMMITTED: sees what the lock's last holder committed
            if now.too_new:
                raise SchemaTooNew(where, now.current, LATEST)
            if m.version <= now.current:
                continue  # another node applied it while we waited for the lock
            await _version_table(conn)
            for stmt in m.statements():
                await conn.execute(stmt)
            await conn.execute("INSERT INTO schema_version (version, name, applied_at) VALUES (%s, %s, %s)",
                               (m.version, m.name, time.time()))
        done.append(m)
    return done


async def _version_table(conn: Any) -> None:
    """Create schema_version, or give a pre-migration one (only `version`) its name and
    applied_at columns."""
    await conn.execute(_VERSION_TABLE)
    cols = await (await conn.execute(
        "SELECT column_name AS c FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = 'schema_version'")).fetchall()
    if "name" not in {r["c"] for r in cols}:
        await conn.execute("ALTER TABLE schema_version ADD COLUMN name TEXT NOT NULL DEFAULT ''")
        await conn.execute("ALTER TABLE schema_version ADD COLUMN applied_at DOUBLE PRECISION")
        await conn.execute("UPDATE schema_version SET name = %s WHERE version = 1", (MIGRATIONS[0].name,))
