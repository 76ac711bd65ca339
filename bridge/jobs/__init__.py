"""Jobs (transcripts of finished and live calls) and transcript exports; their persistence is
bridge.stores.JobStore."""

from bridge.jobs.model import Job, JobSource, JobStatus, Segment, new_job_id

__all__ = ["Job", "JobSource", "JobStatus", "Segment", "new_job_id"]
