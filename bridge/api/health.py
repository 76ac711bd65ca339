"""Liveness/readiness and Prometheus metrics; unauthenticated, as scrapers and probes expect."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from bridge.api.http import service_of
from bridge.config import mask_url_password
from bridge.metrics import CONTENT_TYPE


async def healthz(request: web.Request) -> web.Response:
    """200 once the model is loaded (and, when SIP is on, listening), as the protocol says; 503
    while starting or draining. `degraded` (still 200: the service is up and its REST API works,
    e.g. DELETE to free space) means one of three things, each with its section: new sessions are
    refused because the data directory is (nearly) full (`disk` says how full); store writes wait
    for an unreachable database (`database`, bridge/backlog.py: live sessions go on, their finals
    kept in order until it answers); or the shared event bus cannot be reached (`bus`: sessions go
    on, their events wait in a bounded buffer, and other nodes' dashboards see this node's calls
    again once it is back). `capacity` is the decode headroom (bridge/admission.py): legs free and
    whether sessions are admitted (a node at capacity is healthy, and says so here). `node_id` is
    this node's (docs/cluster.md); `nodes`, only when other nodes share the database, lists each as
    the last heartbeat look saw it (id, url, age_s since its heartbeat, up/draining)."""
    svc = service_of(request)
    sip_ok = svc.sip is None or svc.sip.listening
    disk = await asyncio.to_thread(svc.storage.state)
    bus = svc.bus.health()
    if svc.draining:
        status = "draining"
    elif not (svc.ready and sip_ok):
        status = "starting"
    else:
        status = "degraded" if disk.low or svc.backlog.pending or not bus.connected else "ok"
    body = {"status": status, "model": svc.model_path, "live_sessions": len(svc.calls.calls),
            "uptime_s": round(time.time() - svc.started_at, 1), "disk": disk.to_dict(),
            "database": svc.backlog.state(),
            "sip": svc.sip.stats() if svc.sip is not None else {"enabled": False, "unavailable": svc.sip_unavailable},
            "capacity": svc.admission.headroom().to_dict() if svc.admission is not None else None,
            "node_id": svc.node_id, "bus": {**bus.to_dict(), "url": mask_url_password(bus.url)}}
    if svc.heartbeat is not None and any(n.id != svc.node_id for n in svc.heartbeat.known):
        body["nodes"] = svc.heartbeat.view(time.time())
    return web.json_response(body, status=200 if status in ("ok", "degraded") else 503)


async def metrics(request: web.Request) -> web.Response:
    body = service_of(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
