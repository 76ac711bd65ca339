"""The PostgreSQL backend beyond the shared contract (tests/test_store_contract.py runs that against
it too): two nodes, i.e. two separate `open_stores` of one database each with its own connection
pool, deciding concurrently; opening errors; the schema version; the test server's own refusal
when PostgreSQL is not installed. All against a real PostgreSQL 15 (tests/pg.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from bridge.config import ConfigError
from bridge.stores import (
    InsufficientCredits,
    StoreNotFound,
    Stores,
    StoreUnavailable,
    TokenRefused,
    open_stores,
)
from bridge.stores.postgres.migrations import LATEST, MIGRATIONS
from tests import pg


@pytest.fixture
def pg_url(pg_server: pg.PgServer) -> str:
    return pg_server.new_database()


async def test_two_nodes_reserving_against_one_balance_never_overspend(pg_url: str) -> None:
    # Both nodes start at once on an empty database: the schema is created once, not raced.
    opened = await asyncio.gather(open_stores(pg_url), open_stores(pg_url), return_exceptions=True)
    errors = [o for o in opened if not isinstance(o, Stores)]
    for o in opened:
        if errors and isinstance(o, Stores):
            await o.close()  # a failed start must fail the test, not leave a pool running
    assert errors == []
    a, b = opened
    try:
        key, _ = await a.keys.create_key(credits=1000)
        results = await asyncio.gather(*((a if i % 2 else b).keys.reserve(key.id, f"job_{i}", 30)
                                         for i in range(60)), return_exceptions=True)
        won = [f"job_{i}" for i, r in enumerate(results) if r is None]
        assert len(won) == 33  # 33 * 30 = 990 <= 1000 < 34 * 30
        assert all(isinstance(r, InsufficientCredits) for r in results if r is not None)
        held = await a.keys.open_reservations()
        assert held == {job: 30 for job in won} and (await b.keys.get_key(key.id)).available == 10

        # Both nodes settle every job at once (a retry, a recovery): each is charged once.
        await asyncio.gather(*(n.keys.settle(job, 10) for job in won for n in (a, b)))
        k = await b.keys.get_key(key.id)
        assert (k.balance, k.reserved) == (1000 - 33 * 10, 0)
        assert await a.keys.open_reservations() == {}
    finally:
        await a.close()
        await b.close()


async def test_a_temporary_token_is_accepted_once_across_two_nodes(pg_url: str) -> None:
    a, b = await open_stores(pg_url), await open_stores(pg_url)
    try:
        key, _ = await a.keys.create_key()
        tokens = [(await (a if i % 2 else b).keys.mint_temp_token(key.id, 60))[0] for i in range(10)]
        attempts = [(node, token) for token in tokens for node in (a, b, a, b)]
        results = await asyncio.gather(*(node.keys.consume_temp_token(token) for node, token in attempts),
                                       return_exceptions=True)
        for token in tokens:
            outcomes = [r for (_, t), r in zip(attempts, results, strict=True) if t == token]
            assert outcomes.count(key.id) == 1, outcomes
            assert all(isinstance(r, TokenRefused) and r.code == "TOKEN_REUSED" for r in outcomes if r != key.id)
    finally:
        await a.close()
        await b.close()


async def test_both_url_schemes_open_the_same_database(pg_url: str) -> None:
    first = await open_stores(pg_url)
    _, secret = await first.keys.create_key(name="shared")
    await first.close()
    assert pg_url.startswith("postgresql://")
    again = await open_stores("postgres://" + pg_url.removeprefix("postgresql://"), create=False)
    try:
        assert (await again.keys.verify_key(secret)).name == "shared"
    finally:
        await again.close()


async def test_the_schema_is_migrated_to_the_latest_version_once(pg_url: str) -> None:
    await (await open_stores(pg_url)).close()
    await (await open_stores(pg_url)).close()  # opening again adds nothing
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        rows = await (await conn.execute("SELECT version, name FROM schema_version ORDER BY version")).fetchall()
    assert rows == [(m.version, m.name) for m in MIGRATIONS]
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (LATEST + 1,))  # a later release
    for create in (True, False):
        with pytest.raises(StoreUnavailable, match=rf"database schema v{LATEST + 1} is newer than this code "
                                                   rf"\(v{LATEST}\)"):
            await open_stores(pg_url, create=create)


async def test_missing_or_unreachable_database_is_reported_not_created(pg_server: pg.PgServer,
                                                                       pg_url: str) -> None:
    with pytest.raises(StoreNotFound) as e:
        await open_stores(pg_url, create=False)  # the database exists but holds no callbridge schema
    assert e.value.where == f"127.0.0.1:{pg_server.port}/{pg_url.rsplit('/', 1)[1]}"
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        assert (await (await conn.execute("SELECT to_regclass('jobs')")).fetchone()) == (None,)
    with pytest.raises(StoreNotFound):
        await open_stores(pg_server.url("cb_absent"), create=False)
    with pytest.raises(StoreUnavailable, match="cb_absent"):
        await open_stores(pg_server.url("cb_absent"))  # databases are the operator's to create
    port = pg._free_port()  # nothing listens there
    with pytest.raises(StoreUnavailable, match=f"^cannot open 127.0.0.1:{port}/x: .*Connection refused$") as e:
        await open_stores(f"postgresql://cb:secret@127.0.0.1:{port}/x")
    assert "secret" not in str(e.value)
    with pytest.raises(ConfigError, match="not a valid PostgreSQL URL"):
        await open_stores("postgresql://db.example/call bridge")


def test_the_test_server_fails_clearly_without_postgresql(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(pg, "PG_BIN", tmp_path)
    with pytest.raises(RuntimeError, match=r"install the Debian package `postgresql`"):
        pg.PgServer()
