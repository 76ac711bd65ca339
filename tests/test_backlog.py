"""The write backlog (bridge/backlog.py) on its own: writes that fail to reach the database wait and
land in order; a write the database refuses is raised at once, or dropped if that happens on a
retry, and never holds up the writes behind it. Failures here are real driver exceptions
(sqlite3.OperationalError as a locked or unreachable database gives it, KeyError as the stores
raise for a deleted job); the database is a list the writes append to."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from bridge.backlog import WriteBacklog, transient
from bridge.storage import StorageFull


class FlakyDatabase:
    """Appends each write's name; `down` makes every write fail as an unreachable database does."""

    def __init__(self) -> None:
        self.rows: list[str] = []
        self.down = False

    def write(self, name: str, *, refuse: bool = False):
        async def make() -> None:
            if self.down:
                raise sqlite3.OperationalError("unable to open database file")
            if refuse:
                raise KeyError(f"job of {name} does not exist")
            self.rows.append(name)
        return make


async def _until(pred, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not pred():
            await asyncio.sleep(0.01)


def test_what_counts_as_transient():
    assert transient(sqlite3.OperationalError("database is locked"))
    assert transient(asyncio.TimeoutError()) and transient(ConnectionRefusedError())
    assert not transient(KeyError("job_x")) and not transient(ValueError("x"))
    assert not transient(sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert not transient(sqlite3.OperationalError("database or disk is full"))  # ends the call instead
    assert not transient(StorageFull("full"))


async def test_writes_wait_out_an_outage_and_land_in_order():
    db, backlog = FlakyDatabase(), WriteBacklog(retry_first_s=0.01, retry_max_s=0.05)
    assert await backlog.write("j", "a", db.write("a"))
    db.down = True
    assert not await backlog.write("j", "b", db.write("b"))
    db.down = False
    # queued behind b although the database answers again: never overtakes
    assert not await backlog.write("j", "c", db.write("c"))
    assert backlog.state()["pending_writes"] == 2 and backlog.state()["ok"] is False
    await _until(lambda: backlog.pending == 0)
    assert db.rows == ["a", "b", "c"]
    assert backlog.state()["ok"] is True and backlog.deferred_total == 2


async def test_a_refused_write_raises_at_once_and_is_dropped_on_a_retry():
    db, backlog = FlakyDatabase(), WriteBacklog(retry_first_s=0.01, retry_max_s=0.05)
    with pytest.raises(KeyError):
        await backlog.write("j", "finish", db.write("finish", refuse=True))
    assert backlog.pending == 0  # nothing queued for a write the database answered
    db.down = True
    await backlog.write("j1", "finish", db.write("finish", refuse=True))  # refused once the database is back
    await backlog.write("j2", "segment", db.write("segment"))
    db.down = False
    await _until(lambda: backlog.pending == 0)
    assert db.rows == ["segment"] and backlog.dropped_total == 1  # the one behind it still landed


async def test_flush_reports_what_it_gives_up():
    db, backlog = FlakyDatabase(), WriteBacklog(retry_first_s=0.01, retry_max_s=0.02)
    db.down = True
    await backlog.write("j", "a", db.write("a"))
    await backlog.write("j", "b", db.write("b"))
    assert await backlog.flush(0.2) == 2
    db.down = False
    db2, backlog2 = FlakyDatabase(), WriteBacklog(retry_first_s=0.01)
    db2.down = True
    await backlog2.write("j", "a", db2.write("a"))
    db2.down = False
    assert await backlog2.flush(5) == 0 and db2.rows == ["a"]
