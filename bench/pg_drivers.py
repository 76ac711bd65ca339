"""PostgreSQL drivers for the stores: psycopg 3 (with psycopg_pool) against asyncpg, measured on
the transaction the service runs most, one final saved (bridge/stores/postgres/jobs.py
`add_segment`: lock the job row, look for the same final, number it, insert, commit).

Run: python -m bench.pg_drivers [--segments 3000] [--concurrency 1,16] [--pg-url URL]
     (needs `pip install asyncpg`; psycopg comes with callbridge[postgres])

Both drivers run the same SQL (parameters as %s for psycopg, $n for asyncpg) on the same tables
(the service's own schema, made by its migrations) with a pool of 10 connections, in one run,
alternating per concurrency level, so the load on the machine is shared alike. Figures: segments
saved per second and the latency of one save (p50, p95), and asyncpg's rate over psycopg's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import asyncpg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from bridge.jobs.model import Job, JobSource, new_job_id
from bridge.stores import open_stores
from tests.pg import PgServer  # the tests' throwaway server: Debian postgresql, loopback

from .report import emit_table

_LOCK = "SELECT 1 FROM jobs WHERE id = {0} FOR NO KEY UPDATE"
_SAME = 'SELECT id FROM segments WHERE job_id = {0} AND channel = {1} AND start = {2} AND "end" = {3} AND text = {4}'
_NEXT = "SELECT COALESCE(MAX(seq), -1) + 1 AS n FROM segments WHERE job_id = {0}"
_INSERT = ('INSERT INTO segments (job_id, seq, channel, speaker, start, "end", text, words, speech_final, language,'
           " confidence) VALUES ({0},{1},{2},{3},{4},{5},{6},{7},{8},{9},{10}) RETURNING id")
WORDS = json.dumps([{"word": "segment", "start": 0.0, "end": 0.4, "confidence": 0.9}])


def _sql(template: str, style: str) -> str:
    n = template.count("{")
    marks = ["%s"] * n if style == "psycopg" else [f"${i + 1}" for i in range(n)]
    return template.format(*marks)


async def _psycopg(url: str, jobs: list[str], per_job: int, conc: int) -> list[float]:
    pool = AsyncConnectionPool(url, min_size=conc if conc < 10 else 10, max_size=10, open=False,
                               check=AsyncConnectionPool.check_connection,
                               kwargs={"autocommit": True, "row_factory": dict_row})
    await pool.open(wait=True)
    sql = [_sql(t, "psycopg") for t in (_LOCK, _SAME, _NEXT, _INSERT)]

    async def save(job: str, i: int) -> None:
        async with pool.connection() as db, db.transaction():
            await db.execute(sql[0], (job,))
            if await (await db.execute(sql[1], (job, 0, float(i), i + 0.5, f"final {i}"))).fetchone() is None:
                n = (await (await db.execute(sql[2], (job,))).fetchone())["n"]
                await (await db.execute(sql[3], (job, n, 0, "caller", float(i), i + 0.5, f"final {i}", WORDS, True,
                                                 "en", 0.9))).fetchone()
    try:
        return await _drive(save, jobs, per_job, conc)
    finally:
        await pool.close()


async def _asyncpg(url: str, jobs: list[str], per_job: int, conc: int) -> list[float]:
    pool = await asyncpg.create_pool(url, min_size=conc if conc < 10 else 10, max_size=10)
    sql = [_sql(t, "asyncpg") for t in (_LOCK, _SAME, _NEXT, _INSERT)]

    async def save(job: str, i: int) -> None:
        async with pool.acquire() as db, db.transaction():
            await db.execute(sql[0], job)
            if await db.fetchrow(sql[1], job, 0, float(i), i + 0.5, f"final {i}") is None:
                n = await db.fetchval(sql[2], job)
                await db.fetchval(sql[3], job, n, 0, "caller", float(i), i + 0.5, f"final {i}", WORDS, True, "en", 0.9)
    try:
        return await _drive(save, jobs, per_job, conc)
    finally:
        await pool.close()


async def _drive(save, jobs: list[str], per_job: int, conc: int) -> list[float]:
    """`conc` calls at once, each saving its job's finals one after another (as a leg does)."""
    lat: list[float] = []
    todo = iter(jobs)

    async def worker() -> None:
        for job in todo:
            for i in range(per_job):
                t = time.perf_counter()
                await save(job, i)
                lat.append(time.perf_counter() - t)

    await asyncio.gather(*(worker() for _ in range(conc)))
    return lat


async def main_async(args: argparse.Namespace) -> None:
    pg = None
    url = args.pg_url
    if not url:
        pg = PgServer()
        pg.start()
        url = pg.new_database()
    try:
        stores = await open_stores(url)  # the service's schema, by its migrations
        per_job = 30
        n_jobs = max(1, args.segments // per_job)
        rows = []
        try:
            for conc in args.concurrency:
                got = {}
                for driver, run in (("psycopg 3 + psycopg_pool", _psycopg), ("asyncpg", _asyncpg)):
                    jobs = [new_job_id() for _ in range(n_jobs)]
                    for j in jobs:
                        await stores.jobs.create_job(Job(id=j, owner="bench", source=JobSource.STREAM,
                                                         speakers=["caller"]))
                    t0 = time.perf_counter()
                    lat = sorted(await run(url, jobs, per_job, conc))
                    wall = time.perf_counter() - t0
                    got[driver] = len(lat) / wall
                    rows.append([driver, str(conc), str(len(lat)), f"{len(lat) / wall:.0f}",
                                 f"{1000 * statistics.median(lat):.2f}", f"{1000 * lat[int(0.95 * (len(lat) - 1))]:.2f}"])
                base = got["psycopg 3 + psycopg_pool"]
                for r in rows[-2:]:
                    r.append(f"{float(r[3]) / base:.2f}")
        finally:
            await stores.close()
    finally:
        if pg is not None:
            pg.stop()
    emit_table("pg_drivers", f"PostgreSQL drivers: one final saved (add_segment's transaction), "
               f"{n_jobs * per_job} per run, pool of 10", ["driver", "concurrent calls", "segments", "saves/s",
                                                           "p50 ms", "p95 ms", "vs psycopg"], rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segments", type=int, default=3000)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    ap.add_argument("--pg-url", default="")
    asyncio.run(main_async(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
