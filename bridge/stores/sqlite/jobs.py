"""Jobs and segments in SQLite: the blocking implementation behind bridge.stores.JobStore.

Methods block; the service reaches them through ThreadedJobStore (bridge/stores/sqlite/threaded.py),
so one connection is shared behind a lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from bridge.stores.sqlite import migrations
from bridge.stores.sqlite.db import Tx, connect
from bridge.jobs.model import Job, JobSource, JobStatus, Segment
from bridge.stores.jobs import decode_cursor, encode_cursor

__all__ = ["SqliteJobStore", "fail_live"]


# A final is identified by its job, channel, times and text: a leg never emits two finals of one
# channel starting at one instant, so a write retried after its first try committed finds itself.
_SAME_SEGMENT = 'SELECT * FROM segments WHERE job_id = ? AND channel = ? AND start = ? AND "end" = ? AND text = ?'

_UPDATABLE = {"speakers", "metadata", "audio_path", "duration_s", "config"}
_JSON_FIELDS = {"speakers", "metadata", "config", "error"}


def _row_job(r: sqlite3.Row) -> Job:
    return Job(id=r["id"], owner=r["owner"], status=JobStatus(r["status"]), source=JobSource(r["source"]),
               created_at=r["created_at"], ended_at=r["ended_at"], duration_s=r["duration_s"],
               config=json.loads(r["config"]), speakers=json.loads(r["speakers"]),
               metadata=json.loads(r["metadata"]), audio_path=r["audio_path"],
               error=json.loads(r["error"]) if r["error"] else None, node_id=r["node_id"])


def _row_seg(r: sqlite3.Row) -> Segment:
    return Segment(id=r["id"], job_id=r["job_id"], seq=r["seq"], channel=r["channel"], speaker=r["speaker"],
                   start=r["start"], end=r["end"], text=r["text"], words=json.loads(r["words"]),
                   speech_final=bool(r["speech_final"]), language=r["language"], confidence=r["confidence"],
                   original_text=r["original_text"], original_speaker=r["original_speaker"],
                   edited_at=r["edited_at"])


def fail_live(db: sqlite3.Connection, reason: str, now: float, node_ids: tuple[str, ...] | None) -> list[str]:
    """Inside the caller's transaction: mark live jobs (of `node_ids`, None: all) failed with error
    INTERNAL `reason`, their duration at least their last final's end; segments and audio path
    stay. Returns their ids, sorted. Shared with the node store's take-over (nodes.py)."""
    err = json.dumps({"code": "INTERNAL", "message": reason})
    sql, args = "SELECT id FROM jobs WHERE status = ?", [JobStatus.LIVE.value]
    if node_ids is not None:
        sql += f" AND node_id IN ({','.join('?' * len(node_ids))})"
        args += node_ids
    ids = sorted(r["id"] for r in db.execute(sql, args))
    for jid in ids:
        end = db.execute('SELECT MAX("end") AS e FROM segments WHERE job_id = ?', (jid,)).fetchone()["e"]
        db.execute("UPDATE jobs SET status = ?, error = ?, ended_at = COALESCE(ended_at, ?),"
                   " duration_s = MAX(duration_s, ?) WHERE id = ?",
                   (JobStatus.FAILED.value, err, now, end or 0.0, jid))
    return ids


class SqliteJobStore:
    """SQLite in WAL mode: every write commits at once so a crash (even kill -9) loses nothing
    already acknowledged; synchronous=NORMAL trades only the last commits on power loss."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = connect(self.path)
        with self._lock:
            migrations.apply(self._db, self.path)  # opened alone it migrates; after open_stores: current

    # -- internals -------------------------------------------------------------------------

    def _tx(self) -> Tx:
        return Tx(self._db)

    # -- jobs ------------------------------------------------------------------------------

    def create_job(self, job: Job) -> Job:
        with self._lock, self._tx():
            self._db.execute(
                "INSERT INTO jobs (id, owner, status, source, created_at, ended_at, duration_s, config, speakers,"
                " metadata, audio_path, error, node_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job.id, job.owner, JobStatus(job.status).value, JobSource(job.source).value, job.created_at,
                 job.ended_at, job.duration_s, json.dumps(job.config), json.dumps(job.speakers),
                 json.dumps(job.metadata), job.audio_path, json.dumps(job.error) if job.error else None, job.node_id))
        return job

    def get_job(self, job_id: str, owner: str | None = None) -> Job | None:
        sql, args = "SELECT * FROM jobs WHERE id = ?", [job_id]
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        with self._lock:
            r = self._db.execute(sql, args).fetchone()
        return _row_job(r) if r else None

    def list_jobs(self, owner: str | None = None, status: JobStatus | str | None = None,
                  source: JobSource | str | None = None, since: float | None = None,
                  limit: int = 50, cursor: str | None = None) -> tuple[list[Job], str | None]:
        """Newest first; keyset pagination on (created_at, id) so pages stay stable while jobs are added."""
        limit = max(1, min(int(limit), 1000))
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if status is not None:
            where.append("status = ?")
            args.append(JobStatus(status).value)
        if source is not None:
            where.append("source = ?")
            args.append(JobSource(source).value)
        if since is not None:
            where.append("created_at >= ?")
            args.append(float(since))
        if cursor:
            c_at, c_id = decode_cursor(cursor)
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            args += [c_at, c_at, c_id]
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(limit + 1)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        jobs = [_row_job(r) for r in rows[:limit]]
        nxt = encode_cursor(jobs[-1].created_at, jobs[-1].id) if len(rows) > limit else None
        return jobs, nxt

    def finish_job(self, job_id: str, status: JobStatus | str, duration_s: float,
                   error: dict[str, Any] | None = None, ended_at: float | None = None) -> None:
        with self._lock, self._tx():
            cur = self._db.execute(
                "UPDATE jobs SET status = ?, duration_s = ?, error = ?, ended_at = ? WHERE id = ? AND status = 'live'",
                (JobStatus(status).value, float(duration_s), json.dumps(error) if error else None,
                 ended_at if ended_at is not None else time.time(), job_id))
            if cur.rowcount == 0 and self._db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise KeyError(job_id)

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Change speakers / metadata / audio_path / duration_s / config (not status: use finish_job)."""
        if not fields:
            return
        bad = set(fields) - _UPDATABLE
        if bad:
            raise ValueError(f"cannot update job fields: {sorted(bad)}")
        cols = sorted(fields)
        vals = [json.dumps(fields[c]) if c in _JSON_FIELDS else fields[c] for c in cols]
        with self._lock, self._tx():
            cur = self._db.execute(f"UPDATE jobs SET {', '.join(c + ' = ?' for c in cols)} WHERE id = ?",
                                   (*vals, job_id))
            if cur.rowcount == 0:
                raise KeyError(job_id)

    def delete_job(self, job_id: str) -> Job | None:
        """Delete the job and its segments; returns the deleted job (its audio_path is the caller's to remove)."""
        with self._lock, self._tx():
            r = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if r is None:
                return None
            self._db.execute("DELETE FROM segments WHERE job_id = ?", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return _row_job(r)

    def fail_live_jobs(self, reason: str, node_id: str | None = None) -> list[str]:
        """At startup: jobs still `live` were cut off by a crash; mark them failed, keep their segments.
        `node_id`: only that node's and those from before jobs had a node ('')."""
        with self._lock, self._tx():
            return fail_live(self._db, reason, time.time(), None if node_id is None else (node_id, ""))

    # -- segments --------------------------------------------------------------------------

    def add_segment(self, job_id: str, final: dict[str, Any]) -> Segment:
        """Store one `final` event (Final.to_dict() shape); committed before returning."""
        words = [dict(w) for w in final.get("words") or []]
        with self._lock, self._tx():
            same = self._db.execute(_SAME_SEGMENT, (job_id, int(final.get("channel", 0)), float(final["start"]),
                                                    float(final["end"]), str(final.get("text", "")))).fetchone()
            if same is not None:  # a retried write whose first try committed (bridge/backlog.py)
                return _row_seg(same)
            seq = self._db.execute("SELECT COALESCE(MAX(seq), -1) + 1 AS n FROM segments WHERE job_id = ?",
                                   (job_id,)).fetchone()["n"]
            cur = self._db.execute(
                'INSERT INTO segments (job_id, seq, channel, speaker, start, "end", text, words, speech_final,'
                " language, confidence) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, seq, int(final.get("channel", 0)), str(final.get("speaker", "")), float(final["start"]),
                 float(final["end"]), str(final.get("text", "")), json.dumps(words),
                 1 if final.get("speech_final", True) else 0, final.get("language"), final.get("confidence")))
            seg_id = cur.lastrowid
        return Segment(id=seg_id, job_id=job_id, seq=seq, channel=int(final.get("channel", 0)),
                       speaker=str(final.get("speaker", "")), start=float(final["start"]), end=float(final["end"]),
                       text=str(final.get("text", "")), words=words, speech_final=bool(final.get("speech_final", True)),
                       language=final.get("language"), confidence=final.get("confidence"))

    def segments(self, job_id: str) -> list[Segment]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM segments WHERE job_id = ? ORDER BY start, channel, seq",
                                    (job_id,)).fetchall()
        return [_row_seg(r) for r in rows]

    def edit_segment(self, job_id: str, segment_id: int, text: str | None = None,
                     speaker: str | None = None) -> Segment:
        """Human correction; the first original_text/original_speaker are kept so edits can be audited."""
        with self._lock, self._tx():
            r = self._db.execute("SELECT * FROM segments WHERE job_id = ? AND id = ?",
                                 (job_id, segment_id)).fetchone()
            if r is None:
                raise KeyError(segment_id)
            if text is not None or speaker is not None:
                self._db.execute(
                    "UPDATE segments SET original_text = COALESCE(original_text, text),"
                    " original_speaker = COALESCE(original_speaker, speaker),"
                    " text = COALESCE(?, text), speaker = COALESCE(?, speaker), edited_at = ? WHERE id = ?",
                    (text, speaker, time.time(), segment_id))
                r = self._db.execute("SELECT * FROM segments WHERE id = ?", (segment_id,)).fetchone()
        return _row_seg(r)

    def rename_speaker(self, job_id: str, old: str, new: str) -> int:
        """Relabel a speaker everywhere in the job; returns how many segments changed."""
        with self._lock, self._tx():
            r = self._db.execute("SELECT speakers FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if r is None:
                raise KeyError(job_id)
            speakers = [new if s == old else s for s in json.loads(r["speakers"])]
            self._db.execute("UPDATE jobs SET speakers = ? WHERE id = ?", (json.dumps(speakers), job_id))
            cur = self._db.execute(
                "UPDATE segments SET original_text = COALESCE(original_text, text),"
                " original_speaker = COALESCE(original_speaker, speaker), speaker = ?, edited_at = ?"
                " WHERE job_id = ? AND speaker = ?", (new, time.time(), job_id, old))
            return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
