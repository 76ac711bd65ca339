"""The embedded SQLite database file shared by the job, key and webhook stores (by default
`<data_dir>/callbridge.db`; bridge/stores/sqlite/__init__.py).

One connection per store, in autocommit mode with explicit `BEGIN IMMEDIATE` transactions: WAL
lets readers run beside the writer, and IMMEDIATE takes the write lock up front so two processes
(the service and `callbridge keys`) never interleave a read-modify-write.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["connect", "Tx"]


def connect(path: str) -> sqlite3.Connection:
    """Open (creating its folder) with WAL and synchronous=NORMAL: every commit survives a
    process crash (kill -9); only the last commits can be lost on power failure."""
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # check_same_thread=False: asyncio.to_thread uses several worker threads; callers hold a lock.
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


class Tx:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
