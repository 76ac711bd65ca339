"""Jobs and segments in PostgreSQL: bridge.stores.JobStore on the shared pool (pool.py). The
tables are defined by the migrations (migrations.py).
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg

from bridge.jobs.model import Job, JobSource, JobStatus, Segment
from bridge.stores.jobs import decode_cursor, encode_cursor
from bridge.stores.postgres.pool import Pool

__all__ = ["PgJobStore", "fail_live"]

_UPDATABLE = {"speakers", "metadata", "audio_path", "duration_s", "config"}
_JSON_FIELDS = {"speakers", "metadata", "config", "error"}


def _row_job(r: dict[str, Any]) -> Job:
    return Job(id=r["id"], owner=r["owner"], status=JobStatus(r["status"]), source=JobSource(r["source"]),
               created_at=r["created_at"], ended_at=r["ended_at"], duration_s=r["duration_s"],
               config=json.loads(r["config"]), speakers=json.loads(r["speakers"]),
               metadata=json.loads(r["metadata"]), audio_path=r["audio_path"],
               error=json.loads(r["error"]) if r["error"] else None, node_id=r["node_id"])


def _row_seg(r: dict[str, Any]) -> Segment:
    return Segment(id=r["id"], job_id=r["job_id"], seq=r["seq"], channel=r["channel"], speaker=r["speaker"],
                   start=r["start"], end=r["end"], text=r["text"], words=json.loads(r["words"]),
                   speech_final=bool(r["speech_final"]), language=r["language"], confidence=r["confidence"],
                   original_text=r["original_text"], original_speaker=r["original_speaker"],
                   edited_at=r["edited_at"])


async def fail_live(db: psycopg.AsyncConnection, reason: str, now: float,
                    node_ids: tuple[str, ...] | None) -> list[str]:
    """Inside the caller's transaction: mark live jobs (of `node_ids`, None: all) failed with error
    INTERNAL `reason`, their duration at least their last final's end; segments and audio path
    stay. Returns their ids, sorted. Shared with the node store's take-over (nodes.py)."""
    err = json.dumps({"code": "INTERNAL", "message": reason})
    sql = ("UPDATE jobs j SET status = %s, error = %s, ended_at = COALESCE(ended_at, %s),"
           ' duration_s = GREATEST(duration_s, COALESCE((SELECT MAX(s."end") FROM segments s'
           " WHERE s.job_id = j.id), 0)) WHERE status = %s")
    args: list[Any] = [JobStatus.FAILED.value, err, now, JobStatus.LIVE.value]
    if node_ids is not None:
        sql += " AND node_id = ANY(%s)"
        args.append(list(node_ids))
    rows = await (await db.execute(sql + " RETURNING id", args)).fetchall()
    return sorted(r["id"] for r in rows)


class PgJobStore:
    """bridge.stores.JobStore in PostgreSQL; every method is one transaction on a pooled connection."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def create_job(self, job: Job) -> Job:
        async with self._pool.tx() as db:
            await db.execute(
                "INSERT INTO jobs (id, owner, status, source, created_at, ended_at, duration_s, config, speakers,"
                " metadata, audio_path, error, node_id) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                (job.id, job.owner, JobStatus(job.status).value, JobSource(job.source).value, job.created_at,
                 job.ended_at, job.duration_s, json.dumps(job.config), json.dumps(job.speakers),
                 json.dumps(job.metadata), job.audio_path, json.dumps(job.error) if job.error else None, job.node_id))
        return job

    async def get_job(self, job_id: str, owner: str | None = None) -> Job | None:
        sql, args = "SELECT * FROM jobs WHERE id = %s", [job_id]
        if owner is not None:
            sql += " AND owner = %s"
            args.append(owner)
        async with self._pool.tx() as db:
            r = await (await db.execute(sql, args)).fetchone()
        return _row_job(r) if r else None

    async def list_jobs(self, owner: str | None = None, status: JobStatus | str | None = None,
                        source: JobSource | str | None = None, since: float | None = None,
                        limit: int = 50, cursor: str | None = None) -> tuple[list[Job], str | None]:
        limit = max(1, min(int(limit), 1000))
        where: list[str] = []
        args: list[Any] = []
        if owner is not None:
            where.append("owner = %s")
            args.append(owner)
        if status is not None:
            where.append("status = %s")
            args.append(JobStatus(status).value)
        if source is not None:
            where.append("source = %s")
            args.append(JobSource(source).value)
        if since is not None:
            where.append("created_at >= %s")
            args.append(float(since))
        if cursor:
            c_at, c_id = decode_cursor(cursor)
            where.append("(created_at, id) < (%s, %s)")
            args += [c_at, c_id]
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT %s"
        args.append(limit + 1)
        async with self._pool.tx() as db:
            rows = await (await db.execute(sql, args)).fetchall()
        jobs = [_row_job(r) for r in rows[:limit]]
        nxt = encode_cursor(jobs[-1].created_at, jobs[-1].id) if len(rows) > limit else None
        return jobs, nxt

    async def add_segment(self, job_id: str, final: dict[str, Any]) -> Segment:
        words = [dict(w) for w in final.get("words") or []]
        async with self._pool.tx() as db:
            # The job row's lock orders concurrent writers of one job, so seq stays unique.
            await db.execute("SELECT 1 FROM jobs WHERE id = %s FOR NO KEY UPDATE", (job_id,))
            same = await (await db.execute(
                'SELECT * FROM segments WHERE job_id = %s AND channel = %s AND start = %s AND "end" = %s AND text = %s',
                (job_id, int(final.get("channel", 0)), float(final["start"]), float(final["end"]),
                 str(final.get("text", ""))))).fetchone()
            if same is not None:  # a retried write whose first try committed (bridge/backlog.py)
                return _row_seg(same)
            r = await (await db.execute("SELECT COALESCE(MAX(seq), -1) + 1 AS n FROM segments WHERE job_id = %s",
                                        (job_id,))).fetchone()
            seq = r["n"]
            r = await (await db.execute(
                'INSERT INTO segments (job_id, seq, channel, speaker, start, "end", text, words, speech_final,'
                " language, confidence) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) RETURNING id",
                (job_id, seq, int(final.get("channel", 0)), str(final.get("speaker", "")), float(final["start"]),
                 float(final["end"]), str(final.get("text", "")), json.dumps(words),
                 bool(final.get("speech_final", True)), final.get("language"), final.get("confidence")))).fetchone()
        return Segment(id=r["id"], job_id=job_id, seq=seq, channel=int(final.get("channel", 0)),
                       speaker=str(final.get("speaker", "")), start=float(final["start"]), end=float(final["end"]),
                       text=str(final.get("text", "")), words=words, speech_final=bool(final.get("speech_final", True)),
                       language=final.get("language"), confidence=final.get("confidence"))

    async def segments(self, job_id: str) -> list[Segment]:
        async with self._pool.tx() as db:
            rows = await (await db.execute("SELECT * FROM segments WHERE job_id = %s ORDER BY start, channel, seq",
                                           (job_id,))).fetchall()
        return [_row_seg(r) for r in rows]

    async def finish_job(self, job_id: str, status: JobStatus | str, duration_s: float,
                         error: dict[str, Any] | None = None, ended_at: float | None = None) -> None:
        async with self._pool.tx() as db:
            cur = await db.execute(
                "UPDATE jobs SET status = %s, duration_s = %s, error = %s, ended_at = %s"
                " WHERE id = %s AND status = 'live'",
                (JobStatus(status).value, float(duration_s), json.dumps(error) if error else None,
                 ended_at if ended_at is not None else time.time(), job_id))
            if cur.rowcount == 0 and await (await db.execute("SELECT 1 FROM jobs WHERE id = %s", (job_id,))
                                            ).fetchone() is None:
                raise KeyError(job_id)

    async def update_job(self, job_id: str, **fields: Any) -> None:
        if not fields:
            return
        bad = set(fields) - _UPDATABLE
        if bad:
            raise ValueError(f"cannot update job fields: {sorted(bad)}")
        cols = sorted(fields)  # names from _UPDATABLE only, never from the caller
        vals = [json.dumps(fields[c]) if c in _JSON_FIELDS else fields[c] for c in cols]
        async with self._pool.tx() as db:
            cur = await db.execute(f"UPDATE jobs SET {', '.join(c + ' = %s' for c in cols)} WHERE id = %s",
                                   (*vals, job_id))
            if cur.rowcount == 0:
                raise KeyError(job_id)

    async def edit_segment(self, job_id: str, segment_id: int, text: str | None = None,
                           speaker: str | None = None) -> Segment:
        async with self._pool.tx() as db:
            if text is not None or speaker is not None:
                cur = await db.execute(
                    "UPDATE segments SET original_text = COALESCE(original_text, text),"
                    " original_speaker = COALESCE(original_speaker, speaker),"
                    " text = COALESCE(%s::text, text), speaker = COALESCE(%s::text, speaker), edited_at = %s"
                    " WHERE job_id = %s AND id = %s RETURNING *", (text, speaker, time.time(), job_id, segment_id))
            else:
                cur = await db.execute("SELECT * FROM segments WHERE job_id = %s AND id = %s", (job_id, segment_id))
            r = await cur.fetchone()
        if r is None:
            raise KeyError(segment_id)
        return _row_seg(r)

    async def rename_speaker(self, job_id: str, old: str, new: str) -> int:
        async with self._pool.tx() as db:
            r = await (await db.execute("SELECT speakers FROM jobs WHERE id = %s FOR NO KEY UPDATE",
                                        (job_id,))).fetchone()
            if r is None:
                raise KeyError(job_id)
            speakers = [new if s == old else s for s in json.loads(r["speakers"])]
            await db.execute("UPDATE jobs SET speakers = %s WHERE id = %s", (json.dumps(speakers), job_id))
            cur = await db.execute(
                "UPDATE segments SET original_text = COALESCE(original_text, text),"
                " original_speaker = COALESCE(original_speaker, speaker), speaker = %s, edited_at = %s"
                " WHERE job_id = %s AND speaker = %s", (new, time.time(), job_id, old))
            return cur.rowcount

    async def delete_job(self, job_id: str) -> Job | None:
        async with self._pool.tx() as db:  # segments go with it (ON DELETE CASCADE)
            r = await (await db.execute("DELETE FROM jobs WHERE id = %s RETURNING *", (job_id,))).fetchone()
        return _row_job(r) if r else None

    async def fail_live_jobs(self, reason: str, node_id: str | None = None) -> list[str]:
        async with self._pool.tx() as db:
            return await fail_live(db, reason, time.time(), None if node_id is None else (node_id, ""))

    async def close(self) -> None:
        await self._pool.release()
