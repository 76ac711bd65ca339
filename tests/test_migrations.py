"""Schema migrations, against real SQLite files and a real PostgreSQL 15 (tests/pg.py).

The upgrade tests start from databases the PREVIOUS release wrote, committed as dumps in
tests/data/: schema-v1-sqlite.sql (`sqlite3 FILE .dump`) and schema-v1-postgres.sql
(`pg_dump --inserts --no-owner --no-privileges`), both made by running the stores of commit
8497f87 (`git archive 8497f87`, PYTHONPATH pointing at it) through tests/data/schema_v1_make.py,
whose docstring has the exact commands and lists the rows it wrote: three jobs (completed with an
edited segment, failed, live with an open credit reservation), a config key, a metered key, a
revoked key, a temporary token, an endpoint with a delivered, a pending and a dead delivery.

Also: a fresh database gets every migration; concurrent openers apply each once; a database
newer than this code is refused before anything is touched; `callbridge db status|migrate`; the
`--database-url` / CALLBRIDGE_DATABASE_URL names of storage.url.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bridge.cli import main as cli_main
from bridge.config import load_config
from bridge.jobs.model import JobStatus
from bridge.stores import (
    SchemaOutdated,
    SchemaTooNew,
    StoreNotFound,
    Stores,
    migrate,
    open_stores,
    schema_status,
    store_url,
)
from bridge.stores.postgres import migrations as pg_migrations
from bridge.stores.sqlite import migrations as sqlite_migrations
from bridge.stores.sqlite import path_of
from tests import pg
from tests.test_service_process import free_port

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
CONFIG_KEY = "cb-fixture-config-key-0123456789"  # tests/data/schema_v1_make.py
V1_TABLES = {  # table -> its key, for comparing rows before and after
    "jobs": "id", "segments": "id", "api_keys": "id", "temp_tokens": "token_hash",
    "credit_reservations": "job_id", "webhook_endpoints": "id", "webhook_deliveries": "id", "schema_version": "version",
}
LATEST = sqlite_migrations.LATEST
BACKENDS = ("sqlite", "postgresql")


# -- databases --------------------------------------------------------------------------------


def _fresh_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite://{tmp_path / 'callbridge.db'}"
    return request.getfixturevalue("pg_server").new_database()


def _load_v1(backend: str, url: str) -> None:
    """The previous release's database, from its committed dump."""
    if backend == "sqlite":
        with sqlite3.connect(path_of(url)) as db:
            db.executescript((DATA / "schema-v1-sqlite.sql").read_text())
        return
    # pg_dump 15.14+ brackets its output in \restrict / \unrestrict, which older psql do not know
    dump = "".join(line for line in (DATA / "schema-v1-postgres.sql").read_text().splitlines(keepends=True)
                   if not line.startswith(("\\restrict", "\\unrestrict")))
    r = subprocess.run([str(pg.PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-", url],
                       input=dump, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def query(url: str, sql: str) -> list[tuple]:
    if url.startswith("sqlite://"):
        with sqlite3.connect(path_of(url)) as db:
            return [tuple(r) for r in db.execute(sql)]
    with psycopg.connect(url) as conn:
        return [tuple(r) for r in conn.execute(sql)]


def columns(url: str, table: str) -> list[str]:
    if url.startswith("sqlite://"):
        return [r[1] for r in query(url, f"PRAGMA table_info({table})")]
    return [r[0] for r in query(url, "SELECT column_name FROM information_schema.columns WHERE table_schema = "
                                     f"current_schema() AND table_name = '{table}' ORDER BY ordinal_position")]


def schema_shape(url: str) -> dict[str, Any]:
    """Tables with their columns (name, type, not null, default) and indexes with their
    definitions: what two databases at one version must share, however they got there."""
    if url.startswith("sqlite://"):
        tables = [r[0] for r in query(url, "SELECT name FROM sqlite_master WHERE type = 'table' "
                                           "AND name NOT LIKE 'sqlite_%' AND name != 'schema_version'")]
        shape: dict[str, Any] = {t: [r[1:] for r in query(url, f"PRAGMA table_info({t})")] for t in tables}
        shape["indexes"] = {r[0]: [c[2] for c in query(url, f"PRAGMA index_info({r[0]})")]
                            for r in query(url, "SELECT name FROM sqlite_master WHERE type = 'index' "
                                                "AND name NOT LIKE 'sqlite_%'")}
        return shape
    cols = query(url, "SELECT table_name, column_name, data_type, is_nullable, column_default, collation_name "
                      "FROM information_schema.columns WHERE table_schema = current_schema() "
                      "AND table_name != 'schema_version' ORDER BY table_name, ordinal_position")
    shape = {}
    for table, *rest in cols:
        shape.setdefault(table, []).append(tuple(rest))
    shape["indexes"] = dict(query(url, "SELECT indexname, indexdef FROM pg_indexes "
                                       "WHERE schemaname = current_schema()"))
    return shape


def rows_of(url: str, table: str, cols: list[str]) -> list[tuple]:
    quoted = ", ".join(f'"{c}"' for c in cols)
    return query(url, f"SELECT {quoted} FROM {table} ORDER BY {V1_TABLES[table]}")


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def fresh_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _fresh_url(backend, request, tmp_path)


@pytest.fixture
def v1_url(backend: str, fresh_url: str) -> str:
    _load_v1(backend, fresh_url)
    return fresh_url


# -- the lists --------------------------------------------------------------------------------


def test_both_backends_list_the_same_versions_and_names() -> None:
    assert [(m.version, m.name) for m in sqlite_migrations.MIGRATIONS] == \
           [(m.version, m.name) for m in pg_migrations.MIGRATIONS] == [(1, "initial"), (2, "cluster")]


async def test_version_1_is_the_schema_the_previous_release_made(backend: str, v1_url: str,
                                                                  request: pytest.FixtureRequest,
                                                                  tmp_path: Path) -> None:
    """Migration 1 run alone builds exactly the tables and indexes 8497f87 made (the dump)."""
    own = _fresh_url(backend, request, tmp_path / "own")
    (tmp_path / "own").mkdir()
    migration_1 = (sqlite_migrations if backend == "sqlite" else pg_migrations).MIGRATIONS[0]
    if backend == "sqlite":
        with sqlite3.connect(path_of(own)) as db:
            for stmt in migration_1.statements():
                db.execute(stmt)
    else:
        with psycopg.connect(own) as conn:
            for stmt in migration_1.statements():
                conn.execute(stmt)
    assert schema_shape(own) == schema_shape(v1_url)


# -- upgrading the previous release's database ------------------------------------------------


async def test_a_previous_release_database_upgrades_with_its_data_intact(backend: str, v1_url: str,
                                                                        request: pytest.FixtureRequest,
                                                                        tmp_path: Path) -> None:
    before = {t: (cols := columns(v1_url, t), rows_of(v1_url, t, cols)) for t in V1_TABLES}
    assert query(v1_url, "SELECT version FROM schema_version") == [(1,)]

    stores = await open_stores(v1_url)  # as `serve` opens it
    try:
        assert stores.migrated == ((2, "cluster"),)
        # every row of the release, unchanged, column by column
        for table, (cols, rows) in before.items():
            if table != "schema_version":  # which gains a row: below
                assert rows_of(v1_url, table, cols) == rows, table
        # the new columns have their defaults, the new tables are empty
        assert query(v1_url, "SELECT DISTINCT node_id FROM jobs") == [("",)]
        assert query(v1_url, "SELECT DISTINCT lease_node, lease_until FROM webhook_deliveries") == [(None, None)]
        assert query(v1_url, "SELECT COUNT(*) FROM nodes") == query(v1_url, "SELECT COUNT(*) FROM live_sessions") \
            == [(0,)]

        # and it reads through today's stores
        done = await stores.jobs.get_job("job_v1_completed")
        assert (done.status, done.duration_s, done.metadata, done.speakers) == \
               (JobStatus.COMPLETED, 12.5, {"fixture": "completed"}, ["caller", "agent"])
        segs = await stores.jobs.segments(done.id)
        assert [(s.text, s.original_text, s.speaker) for s in segs] == \
               [("hello there", None, "caller"), ("good morning", "good mornin", "agent")]
        assert (await stores.jobs.get_job("job_v1_failed")).error == {"code": "INTERNAL", "message": "boom"}
        jobs, _ = await stores.jobs.list_jobs()
        assert [j.id for j in jobs] == ["job_v1_live", "job_v1_failed", "job_v1_completed"]
        config_key = await stores.keys.verify_key(CONFIG_KEY)
        assert config_key is not None and config_key.balance is None
        keys = {k.name: k for k in await stores.keys.list_keys()}
        assert (keys["metered"].balance, keys["metered"].reserved) == (1000, 60) and keys["revoked"].revoked
        assert await stores.keys.open_reservations() == {"job_v1_live": 60}
        assert [e.id for e in await stores.webhooks.list_endpoints()] == ["wh_v1"]
        deliveries = await stores.webhooks.list_deliveries("wh_v1")
        assert [(d.event_id, d.status.value, d.last_status) for d in deliveries] == \
               [("evt_9", "dead", 500), ("evt_1", "pending", 503), ("evt_0", "delivered", 200)]
        # writing works too, with the new column's default
        assert await stores.jobs.fail_live_jobs("restarted") == ["job_v1_live"]
    finally:
        await stores.close()

    st = await schema_status(v1_url)
    assert (st.current, st.pending) == (LATEST, ())
    assert [(a.version, a.name, a.applied_at is None) for a in st.applied] == [(1, "initial", True),
                                                                               (2, "cluster", False)]
    # The previous release's own check (8497f87: SQLite reads the first row of schema_version,
    # PostgreSQL its MAX) now sees v2, so that release refuses the upgraded database.
    old_check = ("SELECT version FROM schema_version" if backend == "sqlite"
                 else "SELECT MAX(version) FROM schema_version")
    assert query(v1_url, old_check)[0] == (LATEST,)
    # The same tables and indexes as a database created fresh by this code.
    fresh = _fresh_url(backend, request, tmp_path / "fresh")
    (tmp_path / "fresh").mkdir()
    await (await open_stores(fresh)).close()
    assert schema_shape(v1_url) == schema_shape(fresh)


async def test_a_version_1_sqlite_file_of_an_earlier_commit_is_completed(tmp_path: Path) -> None:
    """Before 8497f87, tables were added under the same version 1 by CREATE ... IF NOT EXISTS at
    every open (the webhook tables came last); such a file gets them when it is first migrated."""
    url = f"sqlite://{tmp_path / 'old.db'}"
    _load_v1("sqlite", url)
    with sqlite3.connect(path_of(url)) as db:
        db.execute("DROP TABLE webhook_deliveries")
        db.execute("DROP TABLE webhook_endpoints")
    stores = await open_stores(url)
    try:
        assert await stores.webhooks.list_endpoints() == []
        assert (await stores.jobs.get_job("job_v1_completed")).status is JobStatus.COMPLETED
    finally:
        await stores.close()
    assert "lease_until" in columns(url, "webhook_deliveries")


# -- fresh databases, concurrency, refusals ---------------------------------------------------


async def test_a_fresh_database_gets_every_migration_recorded(fresh_url: str) -> None:
    stores = await open_stores(fresh_url)
    await stores.close()
    assert stores.migrated == ((1, "initial"), (2, "cluster"))
    rows = query(fresh_url, "SELECT version, name, applied_at FROM schema_version ORDER BY version")
    assert [(v, n) for v, n, _ in rows] == [(1, "initial"), (2, "cluster")] and all(at for *_, at in rows)
    again = await open_stores(fresh_url, create=False, migrate=False)  # up to date: nothing to refuse
    await again.close()
    assert again.migrated == ()


async def test_an_existing_database_without_the_schema_is_not_created_by_a_reader(fresh_url: str) -> None:
    """An empty SQLite file, an empty PostgreSQL database: `keys list` (create=False) finds no
    callbridge database there and creates nothing; `db status` reports version 0, all pending."""
    if fresh_url.startswith("sqlite://"):
        sqlite3.connect(path_of(fresh_url)).close()  # the file exists, empty
    with pytest.raises(StoreNotFound):
        await open_stores(fresh_url, create=False, migrate=False)
    st = await schema_status(fresh_url)
    assert (st.current, [m.name for m in st.pending]) == (0, ["initial", "cluster"])
    assert schema_shape(fresh_url) == {"indexes": {}}


def _all_read_before_any_locks(module: Any, monkeypatch: pytest.MonkeyPatch, openers: int,
                               who: Callable[[], object]) -> None:
    """Make `openers` concurrent openers each read the schema's state (unlocked, as a cheap check)
    before any of them takes the lock to migrate: the interleaving where, without the re-check
    under the lock, each would apply the same migration. `who` tells the openers apart."""
    real = module.status
    seen: set[object] = set()
    if module is sqlite_migrations:
        barrier = threading.Barrier(openers, timeout=60)

        def status(db: Any, where: str) -> Any:
            st = real(db, where)
            if who() not in seen:
                seen.add(who())
                barrier.wait()
            return st
    else:
        abarrier = asyncio.Barrier(openers)

        async def status(db: Any, where: str) -> Any:  # type: ignore[misc]
            st = await real(db, where)
            if who() not in seen:
                seen.add(who())
                await asyncio.wait_for(abarrier.wait(), 60)
            return st
    monkeypatch.setattr(module, "status", status)


async def test_concurrent_openers_apply_each_migration_once(backend: str, v1_url: str, fresh_url: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Three openers at once (threads on their own SQLite connections; three connections to
    PostgreSQL, as three nodes), on a previous release's database: one applies migration 2, the
    others wait for the lock, find it recorded and open."""
    module = sqlite_migrations if backend == "sqlite" else pg_migrations
    who = threading.get_ident if backend == "sqlite" else asyncio.current_task
    _all_read_before_any_locks(module, monkeypatch, 3, who)
    opened = await asyncio.gather(*(open_stores(v1_url) for _ in range(3)), return_exceptions=True)
    errors = [o for o in opened if not isinstance(o, Stores)]
    for o in opened:
        if isinstance(o, Stores):
            await o.close()
    assert errors == []
    assert sorted(o.migrated for o in opened) == [(), (), ((2, "cluster"),)]
    assert query(v1_url, "SELECT version FROM schema_version ORDER BY version") == [(1,), (2,)]


async def test_a_database_newer_than_the_code_is_refused_untouched(fresh_url: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    await (await open_stores(fresh_url)).close()
    newer = LATEST + 1
    if fresh_url.startswith("sqlite://"):  # as a later release records it (newest first)
        query(fresh_url, f"INSERT INTO schema_version (rowid, version, name) VALUES ({-newer}, {newer}, 'later')")
    else:
        with psycopg.connect(fresh_url) as conn:
            conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, 'later')", (newer,))
    shape = schema_shape(fresh_url)
    message = rf"database schema v{newer} is newer than this code \(v{LATEST}\)"
    for create in (True, False):
        for allowed in (True, False):
            with pytest.raises(SchemaTooNew, match=message):
                await open_stores(fresh_url, create=create, migrate=allowed)
    with pytest.raises(SchemaTooNew, match=message):
        await migrate(fresh_url)
    assert schema_shape(fresh_url) == shape

    def run(*argv: str) -> tuple[int, str, str]:
        return cli(capsys, *argv, "--database-url", fresh_url)

    rc, _, err = await asyncio.to_thread(run, "keys", "list")
    assert rc == 2 and f"database schema v{newer} is newer than this code (v{LATEST})" in err
    rc, out, _ = await asyncio.to_thread(run, "db", "status")
    assert rc == 0 and f"schema:   v{newer}, newer than this code (v{LATEST})" in out
    rc, _, err = await asyncio.to_thread(run, "db", "migrate")
    assert rc == 2 and "newer than this code" in err


def test_serve_on_a_database_newer_than_the_code_says_so_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'newer.db'}"
    asyncio.run(migrate(url))
    query(url, f"INSERT INTO schema_version (rowid, version, name) VALUES ({-LATEST - 1}, {LATEST + 1}, 'later')")
    env = {**os.environ, "CALLBRIDGE_SIP_ENABLED": "false", "CALLBRIDGE_API_KEYS": "cb-test-key-0123456789abcdef"}
    r = subprocess.run([sys.executable, "-m", "bridge", "serve", "--database-url", url, "--data-dir",
                        str(tmp_path / "data"), "--http-port", str(free_port())], env=env, capture_output=True, text=True,
                       timeout=120, cwd=str(ROOT))
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == (f"callbridge: error: cannot start: cannot open {tmp_path / 'newer.db'}: "
                                         f"database schema v{LATEST + 1} is newer than this code (v{LATEST})"), r.stderr
    assert "Traceback" not in r.stderr


async def test_an_opener_told_not_to_migrate_refuses_a_database_behind_the_code(v1_url: str) -> None:
    """What `callbridge keys` does (keys create too: it may fill an empty database, not upgrade one)."""
    for create in (True, False):
        with pytest.raises(SchemaOutdated,
                           match=r"database schema v1 is older than this code \(v2; pending: 2 cluster\)"):
            await open_stores(v1_url, create=create, migrate=False)
    assert query(v1_url, "SELECT version FROM schema_version") == [(1,)]
    assert "node_id" not in columns(v1_url, "jobs")


# -- callbridge db ----------------------------------------------------------------------------


async def test_db_status_and_migrate_on_a_previous_release_database(v1_url: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    def run(*argv: str) -> tuple[int, str, str]:
        return cli(capsys, *argv, "--database-url", v1_url)

    rc, out, _ = await asyncio.to_thread(run, "db", "status")
    assert rc == 0
    assert "schema:   v1, this code is at v2" in out and "pending:  2 cluster" in out
    assert "secret" not in out and "postgres@" not in out  # where, never the URL's credentials
    rc, out, err = await asyncio.to_thread(run, "keys", "list")
    assert rc == 2 and "run `callbridge db migrate`" in err and out == ""
    rc, out, _ = await asyncio.to_thread(run, "db", "migrate")
    assert rc == 0 and out.splitlines()[0] == "applied 2 cluster" and "is at v2 (up to date)" in out
    rc, out, _ = await asyncio.to_thread(run, "db", "migrate")
    assert rc == 0 and out.startswith("nothing to apply:")
    rc, out, _ = await asyncio.to_thread(run, "db", "status", "--json")
    status = json.loads(out)
    assert (status["version"], status["latest"], status["up_to_date"], status["pending"]) == (2, 2, True, [])
    assert [a["name"] for a in status["applied"]] == ["initial", "cluster"]
    rc, out, _ = await asyncio.to_thread(run, "keys", "list")
    assert rc == 0 and "metered" in out


def test_db_status_without_a_database_says_where_it_looked(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "db", "status", "--data-dir", str(tmp_path / "nowhere"))
    assert rc == 2 and f"no database at {tmp_path / 'nowhere' / 'callbridge.db'}" in err
    assert not (tmp_path / "nowhere").exists()


# -- the URL's names --------------------------------------------------------------------------


def test_database_url_flag_and_env_name_storage_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[storage]\nurl = "sqlite:///from/file.db"\n')
    short, full, flag = "sqlite:///from/short.db", "sqlite:///from/full.db", "sqlite:///from/flag.db"
    assert load_config(env={}, config_file=toml).storage.url == "sqlite:///from/file.db"
    assert load_config(env={"CALLBRIDGE_DATABASE_URL": short}, config_file=toml).storage.url == short
    assert load_config(env={"CALLBRIDGE_STORAGE_URL": full}, config_file=toml).storage.url == full
    both = {"CALLBRIDGE_DATABASE_URL": short, "CALLBRIDGE_STORAGE_URL": full}
    assert load_config(env=both, config_file=toml).storage.url == full  # the full name wins, as for MODEL
    assert load_config({"database_url": flag}, env=both, config_file=toml).storage.url == flag  # flags win
    with pytest.raises(Exception, match="from environment variable CALLBRIDGE_DATABASE_URL"):
        load_config(env={"CALLBRIDGE_DATABASE_URL": "redis://x"})

    # end to end: the flag, before or after the subcommand, picks the database the command opens
    url = f"sqlite://{tmp_path / 'flagged.db'}"
    rc, out, _ = cli(capsys, "db", "migrate", "--database-url", url)
    assert rc == 0 and str(tmp_path / "flagged.db") in out
    rc, out, _ = cli(capsys, "db", "--database-url", url, "status")
    assert rc == 0 and "(up to date)" in out
    assert store_url(load_config({"database_url": url}, env={})) == url
