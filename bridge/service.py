"""The service process: config, stores, auth, recognizer pool, bus and live calls, plus the app.

`Service` is what `callbridge serve` runs and what the tests start on a free port. Construction
is cheap; `start()` opens the stores, recovers jobs a crash left live, loads the model, and
only then does /healthz answer 200. `drain()` is SIGTERM: no new sessions, live ones end as if
the client had sent `end` (finalized, saved, `completed`), then `stop()` releases everything.

The app from `build_app()` owns that lifecycle (aiohttp's cleanup_ctx): the runner's `setup()`
starts the service and its `cleanup()` stops it, so `serve`, the tests and the benchmarks run it
the same way: setup, listen, (drain while still listening), cleanup.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from bridge import allocator
from bridge.admission import Admission
from bridge.api import events, health, jobs, openapi, tokens, web as web_page, webhooks
from bridge.api.http import SERVICE, json_errors
from bridge.auth import Authenticator, bootstrap_key
from bridge.backlog import WriteBacklog
from bridge.calls import CallRegistry
from bridge.cluster import Heartbeat, Recovery, advertise_url, load_node_id
from bridge.config import Config
from bridge.events.registry import open_bus
from bridge.ingress.base import Ingress
from bridge.ingress.registry import INGRESSES
from bridge.jobs.model import JobSource
from bridge.logs import get_logger
from bridge.metrics import Metrics
from bridge.models.store import resolve
from bridge.recognizer.pool import RecognizerPool
from bridge.recordings import Recordings
from bridge.sessions import SessionGate
from bridge.storage import StorageGuard
from bridge.stores import DB_NAME, Stores, open_stores, store_url
from bridge.webhooks.dispatcher import WebhookDispatcher

__all__ = ["SERVICE", "Service", "DB_NAME"]

log = get_logger("bridge.service")


class Service:
    def __init__(self, config: Config, *, pool: Any = None) -> None:
        self.config = config
        self.data_dir = Path(config.server.data_dir)
        self.recordings_dir = self.data_dir / "recordings"  # live recordings, on this node's disk
        archive = config.storage.recordings_dir
        self.recordings = Recordings(self.recordings_dir, Path(archive) if archive else None)
        # from bus.url (bridge/events/registry.py); connected in start(), with this node's id
        self.bus = open_bus(config.bus.url, max_buffer=config.bus.buffer_events)
        self.calls = CallRegistry()
        self.backlog = WriteBacklog()  # store writes waiting for an unreachable database (bridge/backlog.py)
        self.metrics = Metrics(self)
        # one free-space check for every ingress (streams, WebRTC offers, SIP INVITEs) and /healthz
        self.storage = StorageGuard(self.data_dir, int(config.limits.min_free_disk_mb * 1024 * 1024))
        self.node_id = ""  # this node's id in the shared database (bridge/cluster/identity.py); set by start()
        self.heartbeat: Heartbeat | None = None  # once started: this node's row, and the take-over of dead ones
        self.stores: Stores | None = None  # from storage.url (bridge/stores)
        self.store: Any = None  # self.stores.jobs
        self.keys: Any = None  # self.stores.keys
        self.auth: Any = None
        self.pool = pool
        self._own_pool = pool is None
        self.model_path: str | None = None
        self.generated_key: str | None = None
        self.recovered_jobs: list[str] = []
        self.ingresses: list[Ingress] = []  # running, in bridge/ingress/registry.py's order
        self.unavailable: dict[JobSource, str] = {}  # enabled but cannot run here (SIP without pjsua2)
        self.webhooks: Any = None  # bridge.webhooks.dispatcher.WebhookDispatcher
        self.admission: Admission | None = None  # once the pool exists: capacity to admit new legs
        self.sessions: SessionGate | None = None  # once started: admission and settlement of every session
        self.ready = False
        self.started_at = time.time()
        self.idle_trims = 0  # times the allocator gave free pages back after the last call ended
        self.idle_collected = 0  # unreachable objects the last idle collection freed
        self._trimmer: asyncio.Task | None = None
        self.calls.on_idle = self._trim_when_idle

    @property
    def draining(self) -> bool:
        return self.calls.draining

    def ingress(self, source: JobSource) -> Ingress | None:
        """The running ingress of `source`, or None (disabled, unavailable, or not started)."""
        return next((i for i in self.ingresses if i.source is source), None)

    @property
    def sip(self) -> Any:
        """The SIP gateway (bridge.ingress.sip.SipIngress) when it runs."""
        return self.ingress(JobSource.SIP)

    @property
    def webrtc(self) -> Any:
        """The WebRTC ingress (bridge.ingress.webrtc.WebRtcIngress) when it runs."""
        return self.ingress(JobSource.WEBRTC)

    @property
    def sip_unavailable(self) -> str | None:
        """Why SIP is off although sip.enabled (no pjsua2)."""
        return self.unavailable.get(JobSource.SIP)

    async def start(self) -> None:
        allocator.configure()  # before the first session's buffers (bridge/allocator.py)

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.recordings.prepare()
        self.node_id = load_node_id(self.config)  # before any store or bus use: jobs, sessions, events carry it
        self.bus.node_id = self.node_id
        await self.bus.start()  # a shared bus that cannot be reached: BusUnavailable, one line from `serve`
        if self.storage.state().free_bytes < self.storage.emergency_bytes:
            self.storage.release()  # a (nearly) full disk: spend the emergency reserve on the recovery below
        self.stores = await open_stores(store_url(self.config))  # applies pending schema migrations
        for version, name in self.stores.migrated:
            log.info("schema_migrated", version=version, name=name)
        self.store, self.keys = self.stores.jobs, self.stores.keys
        self.webhooks = WebhookDispatcher(self.bus, self.stores.webhooks, self.store, self.config.webhooks,
                                          credits_per_minute=self.config.credits.per_minute, metrics=self.metrics,
                                          node_id=self.node_id)
        recovery = Recovery(jobs=self.store, keys=self.keys, nodes=self.stores.nodes, bus=self.bus,
                            webhooks=self.webhooks, credits_per_minute=self.config.credits.per_minute,
                            recordings=self.recordings)
        cluster = self.config.cluster
        self.heartbeat = Heartbeat(self.stores.nodes, recovery, node_id=self.node_id, url=advertise_url(self.config),
                                   interval_s=cluster.heartbeat_s, ttl_s=cluster.node_ttl_s,
                                   on_taken_over=self._end_calls_taken_over)
        await self.heartbeat.beat()  # alive before failing our old jobs: no survivor takes them over too
        self.heartbeat.start()  # beating from here: the model load below may take longer than the TTL
        # Only this node's live jobs: another node's live calls on a shared database go on (docs/cluster.md).
        self.recovered_jobs = await self.store.fail_live_jobs("the server stopped while this job was live",
                                                              self.node_id)
        await self.stores.nodes.clear_sessions(self.node_id)
        if self.recovered_jobs:
            log.warning("recovered_live_jobs", count=len(self.recovered_jobs), job_ids=self.recovered_jobs)
        await self.keys.ensure_keys(self.config.server.api_keys)
        self.generated_key = await bootstrap_key(self.keys, str(self.data_dir))
        await recovery.after_restart(self.recovered_jobs)  # recordings and credits, before the webhooks read them
        self.auth = Authenticator(self.keys, self.config.auth)
        await self.webhooks.start(self.recovered_jobs)  # before any call: every event reaches the outbox
        await self.heartbeat.begin_reaping()  # a dead node's jobs can be recovered from here on
        if self.pool is None:
            self.model_path = str(await asyncio.to_thread(resolve, self.config.model.name))
            self.pool = RecognizerPool(self.model_path, size=self.config.model.effective_pool_size,
                                       threads=self.config.model.threads_per_context, engine=self.config.model.engine)
            await asyncio.to_thread(self.pool.start)
        else:
            self.model_path = getattr(self.pool, "model_path", None)
        self.admission = Admission(self.config.capacity, self.pool, lambda: self.calls.legs)
        self.sessions = SessionGate(self.config, calls=self.calls, capacity=self.admission, keys=self.keys,
                                    store=self.store, nodes=self.stores.nodes, node_id=self.node_id, bus=self.bus,
                                    pool=self.pool, storage=self.storage, metrics=self.metrics,
                                    recordings=self.recordings, backlog=self.backlog)
        await self._start_ingresses()
        self.storage.refill()
        self.ready = True
        log.info("service_ready", node_id=self.node_id, model=self.model_path, pool_size=self.pool.size,
                 data_dir=str(self.data_dir))
        refusal = self.storage.refusal()
        if refusal is not None:
            log.warning("refusing_sessions", reason=refusal, **self.storage.state().to_dict())

    async def _start_ingresses(self) -> None:
        """Every ingress the config enables, in the registry's order. One that cannot run on this
        machine (SIP without pjsua2, e.g. on Python 3.12+) is left off with a warning; one that
        fails to start stops the service's start."""
        for kind in INGRESSES:
            if not kind.enabled(self.config):
                continue
            missing = kind.unavailable()
            if missing is not None:
                self.unavailable[kind.source] = missing[0]
                log.warning(f"{kind.source.value}_disabled", reason=missing[0], hint=missing[1])
                continue
            ingress = kind(self)
            try:
                await ingress.start()
            except BaseException:
                await ingress.stop()
                raise
            self.ingresses.append(ingress)

    def _end_calls_taken_over(self) -> None:
        """Another node took this one for dead (it could not reach the database for a TTL) and
        failed its live jobs, settled them and sent their webhooks: end their calls, whose ends
        the store no longer takes (the first ending wins), rather than let them run on unbilled."""
        for call in list(self.calls.calls.values()):
            call.request_stop("this node was taken over by another (its heartbeat expired)")

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

    async def drain(self) -> list[str]:
        timeout = self.config.limits.drain_timeout_s
        log.info("draining", live_calls=len(self.calls.calls), timeout_s=timeout)
        if self.heartbeat is not None:
            await self.heartbeat.drain()
        for ingress in self.ingresses:
            await ingress.drain(timeout)
        left = await self.calls.drain(timeout)
        for job_id in left:
            call = self.calls.calls.get(job_id)
            if call is not None:
                log.warning("drain_deadline_passed", job_id=job_id)
                await call.abort()
        return left

    async def stop(self) -> None:
        left = await self.drain() if self.calls.calls else []
        self.ready = False
        for ingress in self.ingresses:  # what the drain left (peer connections, SIP workers)
            await ingress.stop()
        if self.sessions is not None:  # credit releases of INVITEs the SIP stop gave up
            await self.sessions.aclose()
        # the writes of ended calls that wait for the database (their finals, ends and settlements)
        unwritten = await self.backlog.flush(self.config.limits.drain_timeout_s)
        if self.heartbeat is not None:  # before the webhooks stop: no take-over runs past here
            # A job the drain left live, or one whose end never reached the database, keeps the row:
            # it expires and a survivor fails the job, settles it and sends its webhooks.
            try:
                await self.heartbeat.stop(leave=not left and not unwritten)
            except Exception as e:  # noqa: BLE001 - the row expires by itself
                log.error("node_not_removed", node_id=self.node_id, error=repr(e))
        if self.webhooks is not None:  # after the calls: their last events are in the outbox
            await self.webhooks.stop()
        await self.bus.close()  # after the webhooks: the calls' last events go out to the other nodes
        if self._trimmer is not None:
            self._trimmer.cancel()
        if self._own_pool and self.pool is not None:
            await asyncio.to_thread(self.pool.close)
        if self.stores is not None:
            await self.stores.close()
        log.info("service_stopped")

    # -- the aiohttp application ------------------------------------------------------------
    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        """Started with the app's runner, stopped with it. A start that fails stops what it had
        opened (SIP workers, stores) before its error goes up, so the caller has nothing to undo."""
        try:
            await self.start()
        except BaseException:
            try:
                await self.stop()
            except Exception:  # noqa: BLE001 - the start's error is the one to report
                log.exception("stop_after_failed_start_failed")
            raise
        yield
        await self.stop()

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.limits.max_frame_bytes + 65536,
                              middlewares=[json_errors])
        app[SERVICE] = self
        app.cleanup_ctx.append(self._lifetime)
        for module in (health, openapi, jobs, tokens, events, webhooks, web_page):
            module.add_routes(app)
        for kind in INGRESSES:  # every registered ingress's routes: a disabled one answers so itself
            app.router.add_routes(kind.routes())
        return app
