"""What becomes of live jobs a crash cut off: this node's own at its restart, a dead node's when a
survivor takes it over. One path for both, so a dead node's calls end as a restarted node's do:
failed, with their saved finals, the audio their recording holds (when this node can read it),
their credits charged for that audio, and their webhooks (the saved finals an endpoint has not
got, then `call_ended` failed) queued in this node's outbox.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection, Sequence
from typing import Protocol

from bridge.audio.wav import repair_wav
from bridge.calls import ended_event, job_credits
from bridge.events.bus import EventBus
from bridge.logs import get_logger
from bridge.recordings import Recordings
from bridge.stores import JobStore, KeyStore, NodeStore

__all__ = ["Recoverer", "Recovery", "recover_recordings"]

log = get_logger("bridge.cluster")


class Recoverer(Protocol):
    """The webhook dispatcher's recovery (bridge/webhooks/dispatcher.py, `WebhookDispatcher.recover`)."""

    async def recover(self, job_ids: Sequence[str], *, end_published: bool = False) -> None: ...


async def recover_recordings(store: JobStore, job_ids: Sequence[str], recordings: Recordings) -> None:
    """Jobs a crash cut off: make each recording's header match the audio it holds, take its
    length as the job's duration, and shelve it where every node reads recordings
    (bridge/recordings.py). The audio received is what the job used (and is billed for): the last
    final's end is 0 for a stream that had no final yet, and the header lags the data by up to one
    flush. A recording this node cannot read (a dead node's local disk) is left as it is: the job
    keeps its path and the duration of its last final."""
    for job_id in job_ids:
        job = await store.get_job(job_id)
        if job is None:
            continue
        found = await asyncio.to_thread(recordings.locate, job_id, job.audio_path)
        if found != job.audio_path:  # shelved before the crash, its new path not saved
            await store.update_job(job_id, audio_path=found)
            job.audio_path = found
        if not job.audio_path:
            continue
        try:
            seconds = await asyncio.to_thread(repair_wav, job.audio_path)
        except OSError as e:
            log.error("recording_not_repaired", job_id=job_id, error=repr(e))
            continue
        if seconds is None:
            log.info("recording_not_here", job_id=job_id, audio_path=job.audio_path, duration_s=job.duration_s)
            continue
        if seconds > job.duration_s:
            await store.update_job(job_id, duration_s=seconds)
        shelved = await recordings.shelve(job_id, job.audio_path)
        if shelved is not None:
            await store.update_job(job_id, audio_path=shelved)
        log.info("recording_recovered", job_id=job_id, recorded_s=seconds, path=shelved or job.audio_path)


class Recovery:
    """Ends the jobs a restart (`after_restart`) or a dead node (`after_takeover`) left live; the
    store has already marked them failed."""

    def __init__(self, *, jobs: JobStore, keys: KeyStore, nodes: NodeStore, bus: EventBus,
                 webhooks: Recoverer, credits_per_minute: float, recordings: Recordings) -> None:
        self.jobs = jobs
        self.recordings = recordings
        self.keys = keys
        self.nodes = nodes
        self.bus = bus
        self.webhooks = webhooks
        self.credits_per_minute = credits_per_minute

    async def used(self, job_id: str) -> int:
        """Credits a job that crashed mid-session actually used: its saved duration (the length
        of its recording, see recover_recordings) x channels."""
        job = await self.jobs.get_job(job_id)
        return 0 if job is None else math.ceil(job_credits(job, self.credits_per_minute))

    async def _orphans(self, job_ids: Collection[str]) -> set[str]:
        """Reservations no live session holds, on any node: a live session's row is written
        before its reservation and deleted after its settlement (bridge/sessions/gate.py)."""
        return set(job_ids) - await self.nodes.session_jobs()

    async def settle(self) -> int:
        """Charge and close every reservation whose session is gone (crashed, or taken over)."""
        n = await self.keys.settle_orphans(self.used, self._orphans)
        if n:
            log.warning("reservations_settled", count=n)
        return n

    async def after_restart(self, job_ids: Sequence[str]) -> None:
        """This node's own jobs, failed at its start: recordings and credits. Its webhooks are
        recovered by the dispatcher's start (`WebhookDispatcher.start(recovered_jobs)`)."""
        await recover_recordings(self.jobs, job_ids, self.recordings)
        await self.settle()

    async def after_takeover(self, node_id: str, job_ids: Sequence[str]) -> None:
        """A dead node's jobs, failed by this node's take-over: recordings, credits, then their
        webhooks into this node's outbox and `call_ended` on this node's bus (a dashboard watching
        one of them sees it end; the dispatcher's tap leaves that one out: `recover` queued it)."""
        await recover_recordings(self.jobs, job_ids, self.recordings)
        await self.settle()
        await self.webhooks.recover(job_ids, end_published=True)
        for job_id in job_ids:
            job = await self.jobs.get_job(job_id)
            if job is not None:
                self.bus.publish(job_id, ended_event(job, self.credits_per_minute), owner=job.owner,
                                 source=job.source.value)
        log.warning("node_taken_over", dead_node=node_id, job_ids=list(job_ids))
