"""Liveness/readiness and Prometheus metrics; unauthenticated, as scrapers and probes expect."""

from __future__ import annotations

import time

from aiohttp import web

from bridge.metrics import CONTENT_TYPE


async def healthz(request: web.Request) -> web.Response:
    """200 once the model is loaded (and, when SIP is on, listening); 503 while starting or draining."""
    from bridge.service import SERVICE

    svc = request.app[SERVICE]
    sip_ok = svc.sip is None or svc.sip.listening
    body = {"status": "ok" if svc.ready and sip_ok and not svc.draining else ("draining" if svc.draining else "starting"),
            "model": svc.model_path, "live_sessions": len(svc.calls.calls),
            "uptime_s": round(time.time() - svc.started_at, 1),
            "sip": svc.sip.stats() if svc.sip is not None else {"enabled": False, "unavailable": svc.sip_unavailable}}
    return web.json_response(body, status=200 if body["status"] == "ok" else 503)


async def metrics(request: web.Request) -> web.Response:
    from bridge.service import SERVICE

    body = request.app[SERVICE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
