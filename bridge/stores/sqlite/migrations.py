"""The SQLite schema, as its migrations, and the runner that applies them (the only place the
SQLite tables are defined; bridge/stores/migrations.py says how versions work).

Each pending migration runs in its own `BEGIN IMMEDIATE` transaction and re-reads the version once
it holds the write lock, so the service and a concurrent `callbridge keys` (or two stores opening
one file) apply it once: the second finds it recorded and skips it.

`schema_version` rows are written with rowid = -version, so a plain `SELECT version FROM
schema_version` (a table scan, in rowid order) returns the newest version first. That is how the
release before migrations (8497f87) reads it: it then refuses a database migrated past v1 rather
than running on a schema it does not know.
"""

from __future__ import annotations

import sqlite3
import time

from bridge.stores.migrations import Migration, SchemaStatus, SchemaTooNew, check_sequence, status_of, to_apply
from bridge.stores.sqlite.db import Tx

__all__ = ["LATEST", "MIGRATIONS", "apply", "status"]

# Version 1: the schema of the release at commit 8497f87, as its stores created it (IF NOT EXISTS:
# databases of earlier commits, which grew tables that way under the same version 1, are completed).
_V1 = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at REAL NOT NULL,
    ended_at REAL,
    duration_s REAL NOT NULL DEFAULT 0,
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
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    channel INTEGER NOT NULL,
    speaker TEXT NOT NULL,
    start REAL NOT NULL,
    "end" REAL NOT NULL,
    text TEXT NOT NULL,
    words TEXT NOT NULL DEFAULT '[]',
    speech_final INTEGER NOT NULL,
    language TEXT,
    confidence REAL,
    original_text TEXT,
    original_speaker TEXT,
    edited_at REAL,
    UNIQUE (job_id, seq)
);
CREATE INDEX IF NOT EXISTS segments_job_order ON segments (job_id, start, channel, seq);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    name TEXT,
    created_at REAL NOT NULL,
    revoked_at REAL,
    balance INTEGER
);
CREATE TABLE IF NOT EXISTS temp_tokens (
    token_hash TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
CREATE INDEX IF NOT EXISTS temp_tokens_expires ON temp_tokens (expires_at);
CREATE TABLE IF NOT EXISTS credit_reservations (
    job_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    credits INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS credit_reservations_owner ON credit_reservations (owner);
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    events TEXT NOT NULL,
    sources TEXT NOT NULL DEFAULT '[]',
    description TEXT NOT NULL DEFAULT '',
    enabled INTEGER NOT NULL DEFAULT 1,
    managed_by TEXT NOT NULL DEFAULT 'api',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_endpoints_owner ON webhook_endpoints (owner, created_at);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints(id) ON DELETE CASCADE,
    job_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    last_attempt_at REAL,
    last_status INTEGER,
    last_error TEXT,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_chain ON webhook_deliveries (status, endpoint_id, job_id, id);
CREATE INDEX IF NOT EXISTS webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id);
CREATE INDEX IF NOT EXISTS webhook_deliveries_job ON webhook_deliveries (job_id, endpoint_id, id);
"""

# Version 2: what several nodes sharing one database need (docs/cluster.md): node heartbeats, the
# node owning each job and live session, and leases on outbox rows.
_V2 = """
CREATE TABLE nodes (id TEXT PRIMARY KEY, url TEXT NOT NULL DEFAULT '', started_at REAL NOT NULL,
                    heartbeat_at REAL NOT NULL, draining INTEGER NOT NULL DEFAULT 0);
ALTER TABLE jobs ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
CREATE INDEX jobs_status_node ON jobs (status, node_id);
CREATE TABLE live_sessions (job_id TEXT PRIMARY KEY, owner TEXT NOT NULL, node_id TEXT NOT NULL,
                            started_at REAL NOT NULL);
CREATE INDEX live_sessions_owner ON live_sessions (owner);
CREATE INDEX live_sessions_node ON live_sessions (node_id);
ALTER TABLE webhook_deliveries ADD COLUMN lease_node TEXT;
ALTER TABLE webhook_deliveries ADD COLUMN lease_until REAL;
CREATE INDEX webhook_deliveries_leased ON webhook_deliveries (endpoint_id, job_id) WHERE lease_node IS NOT NULL;
"""

MIGRATIONS = check_sequence([
    Migration(1, "initial", _V1),
    Migration(2, "cluster", _V2),
])
LATEST = MIGRATIONS[-1].version

# No UNIQUE/PRIMARY KEY on version: an index would let SQLite answer the old release's
# `SELECT version FROM schema_version` from the index, in version order (see the module docstring).
_VERSION_TABLE = ("CREATE TABLE IF NOT EXISTS schema_version "
                  "(version INTEGER NOT NULL, name TEXT NOT NULL DEFAULT '', applied_at REAL)")


def status(db: sqlite3.Connection, where: str) -> SchemaStatus:
    """Read-only: the schema's state (no schema_version table: version 0)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone() is None:
        return status_of("sqlite", where, [], MIGRATIONS)
    return status_of("sqlite", where, [dict(r) for r in db.execute("SELECT * FROM schema_version")], MIGRATIONS)


def apply(db: sqlite3.Connection, where: str, *, create: bool = True, migrate: bool = True) -> list[Migration]:
    """Bring the database to LATEST (see bridge.stores.migrations.to_apply for `create` and
    `migrate`); returns the migrations this call applied. Up to date costs one read, no lock."""
    done = []
    for m in to_apply(status(db, where), create=create, migrate=migrate):
        with Tx(db):  # BEGIN IMMEDIATE: from here no other connection writes this file
            now = status(db, where)
            if now.too_new:
                raise SchemaTooNew(where, now.current, LATEST)
            if m.version <= now.current:
                continue  # another connection applied it while we waited for the lock
            _version_table(db)
            for stmt in m.statements():
                db.execute(stmt)
            db.execute("INSERT INTO schema_version (rowid, version, name, applied_at) VALUES (?, ?, ?, ?)",
                       (-m.version, m.version, m.name, time.time()))
        done.append(m)
    return done


def _version_table(db: sqlite3.Connection) -> None:
    """Create schema_version, or give a pre-migration one (only `version`) its name and
    applied_at columns; such a database is also completed to version 1 (see _V1)."""
    db.execute(_VERSION_TABLE)
    columns = {r["name"] for r in db.execute("PRAGMA table_info(schema_version)")}
    if "name" not in columns:
        db.execute("ALTER TABLE schema_version ADD COLUMN name TEXT NOT NULL DEFAULT ''")
        db.execute("ALTER TABLE schema_version ADD COLUMN applied_at REAL")
        db.execute("UPDATE schema_version SET name = ? WHERE version = 1", (MIGRATIONS[0].name,))
        for stmt in MIGRATIONS[0].statements():
            db.execute(stmt)
