"""Nodes and live sessions in SQLite: the blocking implementation behind bridge.stores.NodeStore.

An SQLite file is one machine's, but several processes may share it (two `callbridge serve` on
one data directory with different node ids), and BEGIN IMMEDIATE makes each count-and-insert or
take-over one step for all of them, as PostgreSQL's locks do for many machines.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from bridge.stores.nodes import DEAD_NODE_REASON, Node, SessionLimitReached, TakeOver
from bridge.stores.sqlite import migrations
from bridge.stores.sqlite.db import Tx, connect
from bridge.stores.sqlite.jobs import fail_live

__all__ = ["SqliteNodeStore"]

def _row_node(r: sqlite3.Row) -> Node:
    return Node(id=r["id"], url=r["url"], started_at=r["started_at"], heartbeat_at=r["heartbeat_at"],
                draining=bool(r["draining"]))


class SqliteNodeStore:
    """Blocking; one connection behind a lock (ThreadedNodeStore runs it in worker threads)."""

    def __init__(self, path: str | Path) -> None:
        self._lock = threading.Lock()
        self._db = connect(str(path))
        with self._lock:
            migrations.apply(self._db, str(path))  # opened alone it migrates; after open_stores: current

    def heartbeat(self, node_id: str, url: str, started_at: float, draining: bool = False,
                  now: float | None = None) -> bool:
        with self._lock, Tx(self._db):
            there = self._db.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is not None
            self._db.execute(
                "INSERT INTO nodes (id, url, started_at, heartbeat_at, draining) VALUES (?,?,?,?,?)"
                " ON CONFLICT (id) DO UPDATE SET url = excluded.url, started_at = excluded.started_at,"
                " heartbeat_at = excluded.heartbeat_at, draining = excluded.draining",
                (node_id, url, started_at, time.time() if now is None else now, int(draining)))
        return there

    def list_nodes(self) -> list[Node]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM nodes ORDER BY started_at, id").fetchall()
        return [_row_node(r) for r in rows]


    def take_over(self, node_id: str, ttl_s: float, reason: str = DEAD_NODE_REASON,
                  now: float | None = None) -> TakeOver | None:
        now = time.time() if now is None else now
        with self._lock, Tx(self._db):
            gone = self._db.execute("DELETE FROM nodes WHERE id = ? AND heartbeat_at < ?", (node_id, now - ttl_s))
            if gone.rowcount == 0:
                return None
            failed = fail_live(self._db, reason, now, (node_id,))
            removed = self._db.execute("DELETE FROM live_sessions WHERE node_id = ?", (node_id,)).rowcount
        return TakeOver(node_id, failed, removed)

    def remove_node(self, node_id: str) -> None:
        with self._lock, Tx(self._db):
            self._db.execute("DELETE FROM nodes WHERE id = ?", (node_id,))

    def open_session(self, job_id: str, owner: str, node_id: str, limit: int | None,
                     now: float | None = None) -> None:
        with self._lock, Tx(self._db):
            live = self._db.execute("SELECT COUNT(*) AS n FROM live_sessions WHERE owner = ?", (owner,)).fetchone()["n"]
            if limit is not None and live >= limit:
                raise SessionLimitReached(live, limit)
            self._db.execute("INSERT INTO live_sessions (job_id, owner, node_id, started_at) VALUES (?,?,?,?)",
                             (job_id, owner, node_id, time.time() if now is None else now))

    def end_session(self, job_id: str) -> None:
        with self._lock, Tx(self._db):
            self._db.execute("DELETE FROM live_sessions WHERE job_id = ?", (job_id,))

    def session_jobs(self) -> set[str]:
        with self._lock:
            return {r["job_id"] for r in self._db.execute("SELECT job_id FROM live_sessions")}

    def clear_sessions(self, node_id: str) -> int:
        with self._lock, Tx(self._db):
            return self._db.execute("DELETE FROM live_sessions WHERE node_id = ?", (node_id,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
