"""Shared HTTP plumbing: JSON errors (every 4xx/5xx has a JSON body) and the caller's identity."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge.auth import AuthError, Principal

if TYPE_CHECKING:
    from bridge.service import Service


def json_error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    body = {"error": {"code": code, "message": message, **extra}}
    return web.json_response(body, status=status)


def http_error(cls: type[web.HTTPException], code: str, message: str) -> web.HTTPException:
    """An aiohttp exception carrying our JSON body, for raising from deep inside a handler."""
    return cls(text=json.dumps({"error": {"code": code, "message": message}}), content_type="application/json")


def service_of(request: web.Request) -> Service:
    """The running Service of the app that routed `request`."""
    from bridge.service import SERVICE

    return request.app[SERVICE]


def bad_request(message: str) -> web.HTTPException:
    """400 INVALID_REQUEST with `message`, to raise."""
    return http_error(web.HTTPBadRequest, "INVALID_REQUEST", message)


async def require_principal(request: web.Request, *, allow_temp: bool = False,
                            spend_temp: bool = True) -> Principal:
    """Authenticate or raise 401 with a JSON body (counted in callbridge_auth_failures), before
    any WebSocket upgrade. REST calls never take single-use tokens: those exist for browsers
    opening sockets, and a REST call would burn them; `spend_temp=False` checks one without
    spending it. The key lookup reads SQLite, so it runs in a thread: a slow disk must not
    stall live calls' events."""
    import asyncio

    svc = service_of(request)
    try:
        return await asyncio.to_thread(svc.auth.authenticate, request, allow_temp=allow_temp,
                                       spend_temp=spend_temp)
    except AuthError as e:
        svc.metrics.auth_failures.labels(e.code).inc()
        raise web.HTTPUnauthorized(text=json.dumps(e.to_dict()), content_type="application/json",
                                   headers={"WWW-Authenticate": "Bearer"}) from None


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or 400 with a JSON body saying why."""
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise http_error(web.HTTPBadRequest, "INVALID_REQUEST", f"body is not valid JSON: {e}") from None


def limit_param(query: Any, default: int, maximum: int) -> int:
    """`?limit=` as an integer in 1..maximum, or 400 saying what is wrong."""
    raw = query.get("limit")
    if raw is None or raw == "":
        return default
    try:
        limit = int(raw)
    except ValueError:
        raise bad_request(f"limit={raw!r} is not an integer") from None
    if not 1 <= limit <= maximum:
        raise bad_request(f"limit must be between 1 and {maximum}, got {limit}")
    return limit


def release_heartbeat(ws: web.WebSocketResponse) -> None:
    """Drop the heartbeat timer once the handler is done with the socket. aiohttp (3.14) re-arms
    it when the client's close frame arrives after our close(); the timer then keeps the closed
    response, its request and its buffers alive for `heartbeat` (30 s) after every session
    (tests/test_memory.py). Every WebSocket handler calls it when it is done."""
    cancel = getattr(ws, "_cancel_heartbeat", None)  # private: gone in a later aiohttp, nothing to do then
    if cancel is not None:
        cancel()
