"""Shared fixtures: the real converted model and one recognizer pool for the whole session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests use bench.corpus / bench.drive


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The default bundled model, converted once into the user cache (as `serve` does)."""
    from bridge.models.store import resolve

    return resolve("tiny.en")


@pytest.fixture(scope="session")
def pool(model_path):
    from bridge.recognizer.pool import RecognizerPool

    p = RecognizerPool(model_path, size=2, threads=1)
    p.start()
    yield p
    p.close()


@pytest.fixture
async def server(tmp_path, pool):
    """The real service (SQLite under tmp_path, the shared model pool) on a free loopback port."""
    from tests.serving import start_server

    srv = await start_server(tmp_path / "data", pool)
    yield srv
    await srv.stop()


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL 15 on loopback for the whole session (tests/pg.py); fails, never skips,
    when the server binaries are missing."""
    from tests.pg import PgServer

    srv = PgServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request) -> dict[str, str]:
    """start_server overrides that put the service's stores on each backend in turn: {} keeps
    the default SQLite file in its data_dir; postgresql gives a fresh database on the session's
    PostgreSQL server (pg_server). For the suites that must hold on both (auth, webhooks)."""
    if request.param == "sqlite":
        return {}
    return {"storage.url": request.getfixturevalue("pg_server").new_database()}


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on loopback for the whole session (tests/redisd.py); fails, never skips,
    when the binary is missing. Tests that stop Redis start their own RedisServer."""
    from tests.redisd import RedisServer

    srv = RedisServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.close()
