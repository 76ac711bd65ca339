"""The service process: config, stores, auth, recognizer pool, bus and live calls, plus the app.

`Service` is what `callbridge serve` runs and what the tests start on a free port. Construction
is cheap; `start()` opens the stores, recovers jobs a crash left live, loads the model, and
only then does /healthz answer 200. `drain()` is SIGTERM: no new sessions, live ones end as if
the client had sent `end` (finalized, saved, `completed`), then `stop()` releases everything.
"""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from bridge import allocator
from bridge.admission import Admission
from bridge.audio.wav import repair_wav
from bridge.calls import CallRegistry
from bridge.config import Config
from bridge.events.bus import InProcessBus
from bridge.logs import get_logger
from bridge.metrics import Metrics
from bridge.storage import StorageGuard
from sip import PJSUA2_HINT, pjsua2_missing

__all__ = ["SERVICE", "Service", "DB_NAME"]

log = get_logger("bridge.service")
DB_NAME = "callbridge.db"


class Service:
    def __init__(self, config: Config, *, pool: Any = None) -> None:
        self.config = config
        self.data_dir = Path(config.server.data_dir)
        self.recordings_dir = self.data_dir / "recordings"
        self.bus = InProcessBus()
        self.calls = CallRegistry()
        self.metrics = Metrics(self)
        # one free-space check for every ingress (streams, WebRTC offers, SIP INVITEs) and /healthz
        self.storage = StorageGuard(self.data_dir, int(config.limits.min_free_disk_mb * 1024 * 1024))
        self.store: Any = None
        self.keys: Any = None
        self.auth: Any = None
        self.pool = pool
        self._own_pool = pool is None
        self.model_path: str | None = None
        self.generated_key: str | None = None
        self.recovered_jobs: list[str] = []
        self.sip: Any = None
        self.sip_unavailable: str | None = None  # why SIP is off although sip.enabled (no pjsua2)
        self.webrtc: Any = None  # bridge.ingress.webrtc.WebRtcIngress when webrtc.enabled
        self.webhooks: Any = None  # bridge.webhooks.dispatcher.WebhookDispatcher
        self.admission: Admission | None = None  # once the pool exists: capacity to admit new legs
        self.ready = False
        self.started_at = time.time()
        self.idle_trims = 0  # times the allocator gave free pages back after the last call ended
        self.idle_collected = 0  # unreachable objects the last idle collection freed
        self._trimmer: asyncio.Task | None = None
        self.calls.on_idle = self._trim_when_idle

    @property
    def draining(self) -> bool:
        return self.calls.draining

    async def start(self) -> None:
        from bridge.auth import Authenticator, KeyStore, bootstrap_key
        from bridge.jobs.store import SqliteJobStore

        allocator.configure()  # before the first session's buffers (bridge/allocator.py)

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.recordings_dir.mkdir(parents=True, exist_ok=True)
        if self.storage.state().free_bytes < self.storage.emergency_bytes:
            self.storage.release()  # a (nearly) full disk: spend the emergency reserve on the recovery below
        db = self.data_dir / DB_NAME
        self.store = SqliteJobStore(db)
        self.recovered_jobs = self.store.fail_live_jobs("the server stopped while this job was live")
        if self.recovered_jobs:
            await asyncio.to_thread(recover_recordings, self.store, self.recovered_jobs)
            log.warning("recovered_live_jobs", count=len(self.recovered_jobs), job_ids=self.recovered_jobs)
        self.keys = KeyStore(str(db))
        self.keys.ensure_keys(self.config.server.api_keys)
        self.generated_key = bootstrap_key(self.keys, str(self.data_dir))
        self.keys.settle_orphans(self._orphan_usage)
        self.auth = Authenticator(self.keys, self.config.auth)
        from bridge.webhooks.dispatcher import WebhookDispatcher
        from bridge.webhooks.store import SqliteWebhookStore

        self.webhooks = WebhookDispatcher(self.bus, SqliteWebhookStore(db), self.store, self.config.webhooks,
                                          credits_per_minute=self.config.credits.per_minute, metrics=self.metrics)
        await self.webhooks.start(self.recovered_jobs)  # before any call: every event reaches the outbox
        if self.pool is None:
            from bridge.models.store import resolve
            from bridge.recognizer.pool import RecognizerPool

            self.model_path = str(await asyncio.to_thread(resolve, self.config.model.name))
            self.pool = RecognizerPool(self.model_path, size=self.config.model.effective_pool_size,
                                       threads=self.config.model.threads_per_context)
            await asyncio.to_thread(self.pool.start)
        else:
            self.model_path = getattr(self.pool, "model_path", None)
        self.admission = Admission(self.config.capacity, self.pool, lambda: self.calls.legs)
        self.sip_unavailable = pjsua2_missing() if self.config.sip.enabled else None
        if self.sip_unavailable:  # e.g. Python 3.12+: the service runs, without SIP
            log.warning("sip_disabled", reason=self.sip_unavailable,
                        hint=f"{PJSUA2_HINT}, or set CALLBRIDGE_SIP_ENABLED=false")
        elif self.config.sip.enabled:
            from bridge.ingress.sip import SipIngress

            self.sip = SipIngress(self)
            try:
                await self.sip.start()
            except BaseException:
                await self.sip.stop()
                raise
        if self.config.webrtc.enabled:
            from bridge.ingress.webrtc import WebRtcIngress

            self.webrtc = WebRtcIngress(self)
        self.storage.refill()
        self.ready = True
        log.info("service_ready", model=self.model_path, pool_size=self.pool.size, data_dir=str(self.data_dir))
        refusal = self.storage.refusal()
        if refusal is not None:
            log.warning("refusing_sessions", reason=refusal, **self.storage.state().to_dict())

    def _trim_when_idle(self) -> None:
        """The last live call ended: give the allocator's free pages back once the service stays idle
        (what the busiest moment needed stays resident otherwise; bridge/allocator.py)."""
        if self._trimmer is None or self._trimmer.done():
            self._trimmer = asyncio.get_running_loop().create_task(self._trim_after_delay())

    async def _trim_after_delay(self) -> None:
        await asyncio.sleep(allocator.IDLE_TRIM_DELAY_S)
        if self.calls.calls:
            return  # busy again: the next idle moment trims
        # A finished WebRTC call is a web of reference cycles (aiortc's peer connection, transports,
        # codecs, SSL and SRTP state), freed only by a full collection, which Python starts after
        # enough new allocations, so never while idle: the trim below could give back nothing
        # they held (docs/benchmarks.md, "Memory"). On the loop, where finalizers expect to run.
        self.idle_collected = gc.collect()
        reloaded = await asyncio.to_thread(self.pool.release_scratch)  # whisper's high-water buffers
        before = allocator.stats()
        released = await asyncio.to_thread(allocator.trim)
        self.idle_trims += 1
        log.info("allocator_trimmed", released=released, heap_free_mb=before.get("free_mb"),
                 collected=self.idle_collected, contexts_reloaded=reloaded)

    def _orphan_usage(self, job_id: str) -> int:
        """Credits a job that crashed mid-session actually used: its saved duration (the length
        of its recording, see recover_recordings) x channels."""
        import math

        job = self.store.get_job(job_id)
        if job is None:
            return 0
        from bridge.calls import job_credits

        return math.ceil(job_credits(job, self.config.credits.per_minute))

    async def drain(self) -> list[str]:
        timeout = self.config.limits.drain_timeout_s
        log.info("draining", live_calls=len(self.calls.calls), timeout_s=timeout)
        if self.sip is not None:
            await self.sip.drain(timeout)
        left = await self.calls.drain(timeout)
        for job_id in left:
            call = self.calls.calls.get(job_id)
            if call is not None:
                log.warning("drain_deadline_passed", job_id=job_id)
                await call.abort()
        return left

    async def stop(self) -> None:
        if self.calls.calls:
            await self.drain()
        self.ready = False
        if self.webrtc is not None:  # peer connections left after the drain are closed here
            await self.webrtc.close()
        if self.sip is not None:
            await self.sip.stop()
        if self.webhooks is not None:  # after the calls: their last events are in the outbox
            await self.webhooks.stop()
            self.webhooks.store.close()
        if self._trimmer is not None:
            self._trimmer.cancel()
        if self._own_pool and self.pool is not None:
            await asyncio.to_thread(self.pool.close)
        if self.keys is not None:
            self.keys.close()
        if self.store is not None:
            self.store.close()
        log.info("service_stopped")

    # -- the aiohttp application ------------------------------------------------------------
    def build_app(self) -> web.Application:
        from bridge.api import events, health, jobs, openapi, tokens, web as web_page, webhooks
        from bridge.api.http import json_errors
        from bridge.ingress import stream, webrtc

        app = web.Application(client_max_size=self.config.limits.max_frame_bytes + 65536,
                              middlewares=[json_errors])
        app[SERVICE] = self
        for module in (health, openapi, stream, jobs, tokens, events, webhooks, webrtc, web_page):
            module.add_routes(app)
        return app


def recover_recordings(store: Any, job_ids: list[str]) -> None:
    """Jobs a crash cut off: make each recording's header match the audio it holds and take its
    length as the job's duration. The audio received is what the job used (and is billed for):
    the last final's end is 0 for a stream that had no final yet, and the header lags the data
    by up to one flush."""
    for job_id in job_ids:
        job = store.get_job(job_id)
        if job is None or not job.audio_path:
            continue
        try:
            seconds = repair_wav(job.audio_path)
        except OSError as e:
            log.error("recording_not_repaired", job_id=job_id, error=repr(e))
            continue
        if seconds is not None and seconds > job.duration_s:
            store.update_job(job_id, duration_s=seconds)
        log.info("recording_recovered", job_id=job_id, recorded_s=seconds)


SERVICE = web.AppKey("service", Service)
