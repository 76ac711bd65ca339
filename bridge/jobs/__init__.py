"""Job persistence (transcripts of finished and live calls) and transcript exports."""

from bridge.jobs.model import Job, JobSource, JobStatus, Segment, new_job_id
from bridge.jobs.store import JobStore, SqliteJobStore

__all__ = ["Job", "JobSource", "JobStatus", "JobStore", "Segment", "SqliteJobStore", "new_job_id"]
