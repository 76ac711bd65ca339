"""The job store's interface: jobs (one per call or stream) and their transcript segments.

Async, so a PostgreSQL backend can run on the event loop (an async driver) while the embedded SQLite one
runs its blocking driver in worker threads (bridge/stores/sqlite/threaded.py). Every method is
one transaction: a backend must never let a caller see half of a write.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Protocol

from bridge.jobs.model import Job, JobSource, JobStatus, Segment

__all__ = ["JobStore"]


class JobStore(Protocol):
    """Jobs and segments. Ids: a job's is the caller's (`new_job_id`); a segment's is an integer
    the store assigns (the REST API edits segments by it), increasing in insertion order."""

    async def create_job(self, job: Job) -> Job: ...

    async def get_job(self, job_id: str, owner: str | None = None) -> Job | None:
        """None when absent, or when `owner` is given and is not the job's owner."""

    async def list_jobs(self, owner: str | None = None, status: JobStatus | str | None = None,
                        source: JobSource | str | None = None, since: float | None = None,
                        limit: int = 50, cursor: str | None = None) -> tuple[list[Job], str | None]:
        """Newest first, at most `limit` (1..1000); returns the page and an opaque cursor for the
        next one (None at the end). Pages must stay stable while jobs are added (keyset, not offset);
        a malformed cursor raises ValueError."""

    async def add_segment(self, job_id: str, final: dict[str, Any]) -> Segment:
        """Store one `final` event (Final.to_dict() shape), durably, before returning. Idempotent:
        the same final (job, channel, start, end, text) again returns the stored segment, so a write
        retried after a lost acknowledgement (bridge/backlog.py) is not saved twice."""

    async def segments(self, job_id: str) -> list[Segment]:
        """The job's segments ordered by start, channel, then insertion."""

    async def finish_job(self, job_id: str, status: JobStatus | str, duration_s: float,
                         error: dict[str, Any] | None = None, ended_at: float | None = None) -> None:
        """Set the final status of a live job; KeyError if the job does not exist. The first ending
        wins: a job already ended (failed by a take-over of its node, docs/cluster.md, while the
        node's call went on) keeps its ending, so a late finish cannot bring it back."""

    async def update_job(self, job_id: str, **fields: Any) -> None:
        """Change speakers / metadata / audio_path / duration_s / config (ValueError for any other
        field, KeyError for an unknown job)."""

    async def edit_segment(self, job_id: str, segment_id: int, text: str | None = None,
                           speaker: str | None = None) -> Segment:
        """A human correction; keeps the first original_text/original_speaker. KeyError if absent."""

    async def rename_speaker(self, job_id: str, old: str, new: str) -> int:
        """Relabel a speaker in the job and its segments; returns how many segments changed."""

    async def delete_job(self, job_id: str) -> Job | None:
        """Delete the job and its segments; returns the deleted job (its audio is the caller's)."""

    async def fail_live_jobs(self, reason: str, node_id: str | None = None) -> list[str]:
        """At startup: jobs still `live` were cut off by a crash; mark them failed (error INTERNAL
        `reason`, duration at least the last final's end), keep their segments; returns their ids.
        `node_id`: only the jobs of that node (the one restarting) and those with node '' (from
        before jobs had a node: only a single-node deployment has them); None: every live job."""

    async def close(self) -> None: ...


def encode_cursor(created_at: float, job_id: str) -> str:
    """The opaque paging cursor every backend hands out (`list_jobs`): the last job's
    (created_at, id), so pages are stable whichever node or backend serves the next one."""
    raw = json.dumps([created_at, job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """`encode_cursor`'s inverse; ValueError("invalid cursor") for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        return float(created_at), str(job_id)
    except Exception as e:
        raise ValueError("invalid cursor") from e
