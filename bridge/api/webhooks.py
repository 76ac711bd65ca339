"""Webhook endpoints of the caller's key: `/v1/webhooks` (create, list, get, update, delete),
their delivery log and redelivery (docs/stream-protocol.md, "Webhooks"; docs/webhooks.md).

An endpoint belongs to the key that created it and receives only that key's jobs' events;
another key's endpoint answers 404 like an unknown id. The secret is shown once, in the answer
to the create (or the update that sets it); afterwards only its last four characters.
Operator endpoints from config (`[[webhooks.endpoints]]` with `owner` = a key id) are listed to
that key with `managed_by: "config"`: their deliveries can be read and redelivered, but they are
changed in the config file, not here.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from aiohttp import web

from bridge.api.http import bad_request, http_error, limit_param, read_json, require_principal, service_of
from bridge.logs import get_logger
from bridge.webhooks.model import DeliveryStatus, Endpoint, EndpointError, check_endpoint, new_secret
from bridge.webhooks.targets import TargetBlocked

__all__ = ["add_routes"]

log = get_logger("bridge.api.webhooks")


async def _spec(request: web.Request, creating: bool) -> dict[str, Any]:
    """The checked fields; a URL must also point where a key's endpoint may reach (resolved now;
    every delivery checks again, so a name that changes its address later is refused then)."""
    try:
        spec = check_endpoint(await read_json(request), creating=creating)
    except EndpointError as e:
        raise bad_request(str(e)) from None
    if "url" in spec:
        try:
            await service_of(request).webhooks.policy.check_url(spec["url"])
        except TargetBlocked as e:
            raise bad_request(f"url {spec['url']!r} is not allowed: {e}. Key-owned webhooks reach public addresses "
                              "only, unless the operator allows more (webhooks.allow_private_targets, "
                              "webhooks.allowed_target_networks)") from None
    return spec


def _shown(svc: Any, ep: Endpoint, with_secret: bool = False) -> dict[str, Any]:
    return {**ep.to_dict(with_secret=with_secret), "circuit": svc.webhooks.circuit(ep.id)}


async def _load(request: web.Request, *, writable: bool = False) -> tuple[Any, Endpoint]:
    svc = service_of(request)
    principal = await require_principal(request)
    wid = request.match_info["webhook_id"]
    ep = await svc.webhooks.store.get_endpoint(wid, principal.owner)
    if ep is None:
        raise http_error(web.HTTPNotFound, "NOT_FOUND", f"webhook {wid!r} not found")
    if writable and ep.managed_by == "config":
        raise http_error(web.HTTPConflict, "MANAGED_BY_CONFIG",
                         f"webhook {wid!r} comes from the service config; change it there")
    return svc, ep


async def create(request: web.Request) -> web.Response:
    svc = service_of(request)
    principal = await require_principal(request)
    spec = await _spec(request, creating=True)
    store = svc.webhooks.store
    cap = svc.config.webhooks.max_endpoints_per_key
    if await store.count_endpoints(principal.owner) >= cap:
        raise http_error(web.HTTPConflict, "TOO_MANY_WEBHOOKS",
                         f"this key has {cap} webhooks, the most allowed (webhooks.max_endpoints_per_key)")
    now = time.time()
    ep = Endpoint(id="wh_" + secrets.token_hex(8), owner=principal.owner, url=spec["url"],
                  secret=spec.get("secret") or new_secret(), events=spec["events"], sources=spec["sources"],
                  description=spec.get("description", ""), enabled=spec.get("enabled", True),
                  created_at=now, updated_at=now)
    await store.create_endpoint(ep)
    await svc.webhooks.reload()
    log.info("webhook_created", webhook_id=ep.id, owner=ep.owner, events=list(ep.events))
    return web.json_response(_shown(svc, ep, with_secret=True), status=201,
                             headers={"Location": f"/v1/webhooks/{ep.id}"})


async def list_all(request: web.Request) -> web.Response:
    svc = service_of(request)
    principal = await require_principal(request)
    eps = await svc.webhooks.store.list_endpoints(principal.owner)
    return web.json_response({"webhooks": [_shown(svc, e) for e in eps], "delivering": svc.webhooks.delivering})


async def get_one(request: web.Request) -> web.Response:
    svc, ep = await _load(request)
    return web.json_response(_shown(svc, ep))


async def update(request: web.Request) -> web.Response:
    svc, ep = await _load(request, writable=True)
    spec = await _spec(request, creating=False)
    if not spec:
        raise bad_request("nothing to change: give url, secret, events, sources, description or enabled")
    ep = await svc.webhooks.store.update_endpoint(ep.id, **spec)
    if "url" in spec:
        svc.webhooks.forget(ep.id)
    await svc.webhooks.reload()
    log.info("webhook_updated", webhook_id=ep.id, fields=sorted(spec))
    return web.json_response(_shown(svc, ep, with_secret="secret" in spec))


async def delete(request: web.Request) -> web.Response:
    """The endpoint and its delivery log; events still pending for it are not sent."""
    svc, ep = await _load(request, writable=True)
    await svc.webhooks.store.delete_endpoint(ep.id)
    svc.webhooks.forget(ep.id)
    await svc.webhooks.reload()
    log.info("webhook_deleted", webhook_id=ep.id)
    return web.Response(status=204)


async def deliveries(request: web.Request) -> web.Response:
    """Newest first; `status`, `job_id` filters; `cursor` = the `next` of the previous page."""
    svc, ep = await _load(request)
    q = request.query
    status = q.get("status") or None
    if status is not None and status not in {s.value for s in DeliveryStatus}:
        raise bad_request(f"status={status!r} is not one of {[s.value for s in DeliveryStatus]}")
    limit = limit_param(q, 50, 500)
    before = None
    if q.get("cursor"):
        try:
            before = int(q["cursor"])
        except ValueError:
            raise bad_request(f"cursor={q['cursor']!r} is not a cursor this API returned") from None
    rows = await svc.webhooks.store.list_deliveries(ep.id, status, q.get("job_id") or None, limit + 1, before)
    nxt = str(rows[limit - 1].id) if len(rows) > limit else None
    return web.json_response({"deliveries": [d.to_dict() for d in rows[:limit]], "next": nxt})


def _delivery_id(request: web.Request) -> int:
    raw = request.match_info["delivery_id"]
    try:
        return int(raw)
    except ValueError:
        raise http_error(web.HTTPNotFound, "NOT_FOUND", f"delivery {raw!r} not found") from None


async def delivery(request: web.Request) -> web.Response:
    svc, ep = await _load(request)
    did = _delivery_id(request)
    d = await svc.webhooks.store.get_delivery(ep.id, did)
    if d is None:
        raise http_error(web.HTTPNotFound, "NOT_FOUND", f"delivery {did} not found")
    return web.json_response(d.to_dict())


async def redeliver_one(request: web.Request) -> web.Response:
    """Send one delivery again (any status), with a fresh retry period."""
    svc, ep = await _load(request)
    did = _delivery_id(request)
    n = await svc.webhooks.store.redeliver(ep.id, [did])
    if not n:
        raise http_error(web.HTTPNotFound, "NOT_FOUND", f"delivery {did} not found")
    svc.webhooks.retry_now(ep.id)
    await svc.webhooks.reload()
    log.info("webhook_redeliver", webhook_id=ep.id, delivery_id=did)
    return web.json_response({"redelivered": n}, status=202)


async def redeliver_dead(request: web.Request) -> web.Response:
    """After the receiver is fixed: every dead delivery back to pending, and pending ones that
    wait out a backoff retried at once (`retried_now`)."""
    svc, ep = await _load(request)
    n = await svc.webhooks.store.redeliver(ep.id, None)
    m = await svc.webhooks.store.retry_now(ep.id)
    svc.webhooks.retry_now(ep.id)
    await svc.webhooks.reload()
    log.info("webhook_redeliver_dead", webhook_id=ep.id, count=n, retried_now=m)
    return web.json_response({"redelivered": n, "retried_now": m}, status=202)


async def ping(request: web.Request) -> web.Response:
    """POST a signed `ping` event to the endpoint now; 200 with whether it was delivered and the
    HTTP status (no body, no error detail: see WebhookDispatcher.ping)."""
    svc, ep = await _load(request)
    return web.json_response(await svc.webhooks.ping(ep))


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/webhooks", create)
    r.add_get("/v1/webhooks", list_all)
    r.add_get("/v1/webhooks/{webhook_id}", get_one)
    r.add_patch("/v1/webhooks/{webhook_id}", update)
    r.add_delete("/v1/webhooks/{webhook_id}", delete)
    r.add_get("/v1/webhooks/{webhook_id}/deliveries", deliveries)
    r.add_get("/v1/webhooks/{webhook_id}/deliveries/{delivery_id}", delivery)
    r.add_post("/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver", redeliver_one)
    r.add_post("/v1/webhooks/{webhook_id}/redeliver", redeliver_dead)
    r.add_post("/v1/webhooks/{webhook_id}/test", ping)
