"""Shared HTTP plumbing: JSON errors (every 4xx/5xx has a JSON body) and the caller's identity."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge.auth import AuthError, Principal
from bridge.logs import get_logger
from bridge.storage import is_storage_full

if TYPE_CHECKING:
    from bridge.service import Service


log = get_logger("bridge.api.http")

_REASON_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error answers JSON: aiohttp's own (unknown path, wrong method, body too large) and
    any exception a handler let through, which would otherwise be a text/plain 500. A full disk
    is 507 STORAGE_FULL (the client can retry once space is freed); anything else 500 INTERNAL,
    logged as one line naming where it was raised."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise
        code = _REASON_CODES.get(e.status, f"HTTP_{e.status}")
        body = {"error": {"code": code, "message": f"{e.reason}: {request.method} {request.path}"}}
        headers = {k: v for k, v in e.headers.items() if k.lower() == "allow"}
        return web.json_response(body, status=e.status, headers=headers)
    except Exception as e:  # noqa: BLE001 - the last line of defence: never a traceback page
        if request.writer.output_size:
            raise  # a response (e.g. a WebSocket upgrade) has started: no other can follow it
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else "?"
        if is_storage_full(e):
            log.error("request_failed_storage_full", method=request.method, path=request.path, error=repr(e),
                      where=where)
            return json_error(507, "STORAGE_FULL", "the server's disk is full; retry once space is freed")
        log.error("request_failed", method=request.method, path=request.path, error=repr(e), where=where)
        return json_error(500, "INTERNAL", f"internal error: {type(e).__name__}")


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
