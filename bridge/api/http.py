"""Shared HTTP plumbing: JSON errors (every 4xx/5xx has a JSON body), the caller's identity,
and the one loader for untrusted JSON (bridge/json_input.py, re-exported here)."""

from __future__ import annotations

import functools
import ipaddress
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge.auth import AuthError, Principal
from bridge.backoff import COUNTED_CODES, source_of
from bridge.json_input import JsonInputError, parse_json
from bridge.logs import get_logger
from bridge.storage import is_storage_full

if TYPE_CHECKING:
    from bridge.service import Service

log = get_logger("bridge.api.http")


def client_source(request: web.Request) -> str:
    """Who is on the other end, for the authentication backoff (bridge.backoff.source_of): the
    peer, or behind a trusted reverse proxy (`server.trusted_proxies`) the client it names."""
    trusted = service_of(request).config.server.trusted_proxies
    return source_of(client_address(request.remote, request.headers.getall("X-Forwarded-For", []), trusted))


@functools.lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def client_address(remote: str | None, forwarded_for: list[str], trusted: tuple[str, ...]) -> str | None:
    """The client's address: `remote` unless it is a trusted proxy; then X-Forwarded-For read from
    the right (each proxy appends the address it saw), skipping trusted proxies, so the first
    untrusted address is the client. Entries left of it are whatever the client sent: never
    believed. Behind nginx every client would otherwise be nginx's one address, and ten bad
    credentials from anyone would block everyone (bridge/backoff.py)."""
    nets = _networks(trusted)

    def is_trusted(addr: str | None) -> bool:
        try:
            ip = ipaddress.ip_address((addr or "").split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in n for n in nets)

    if not nets or not is_trusted(remote):
        return remote
    hops = [h.strip() for line in forwarded_for for h in line.split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop):
            return hop
    return hops[0] if hops else remote


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
    """An aiohttp exception carrying our JSON body, for raising from deep inside a handler.
    Every refusal built here is logged in one line (info: the client's mistake, not ours)."""
    log.info("request_refused", status=cls.status_code, code=code, message=message[:300])
    return cls(text=json.dumps({"error": {"code": code, "message": message}}), content_type="application/json")


# Where the app keeps its running Service (set by Service.build_app). Defined here, below the
# service, so the routes (this package and bridge/ingress/) find it without importing it.
SERVICE: web.AppKey[Service] = web.AppKey("service")


def service_of(request: web.Request) -> Service:
    """The running Service of the app that routed `request`."""
    return request.app[SERVICE]


def bad_request(message: str) -> web.HTTPException:
    """400 INVALID_REQUEST with `message`, to raise."""
    return http_error(web.HTTPBadRequest, "INVALID_REQUEST", message)


def _throttled(retry_after: int) -> web.HTTPException:
    body = {"error": {"code": "RATE_LIMITED", "retry_after_s": retry_after,
                      "message": f"too many failed authentications from this address; retry in {retry_after} s"}}
    return web.HTTPTooManyRequests(text=json.dumps(body), content_type="application/json",
                                   headers={"Retry-After": str(retry_after)})


async def require_principal(request: web.Request, *, allow_temp: bool = False,
                            spend_temp: bool = True) -> Principal:
    """Authenticate or raise 401 with a JSON body, before any WebSocket upgrade; 429 (with
    Retry-After) while the caller's address is in authentication backoff (bridge/backoff.py).
    Both are counted in callbridge_auth_failures{code} and logged in one line.

    Only the ingest routes take single-use tokens (`allow_temp`): a token opens one session, and
    any other route refuses it without spending it; `spend_temp=False` checks one without
    spending it. The key store is async (the SQLite backend reads in a worker thread): a slow
    disk must not stall live calls' events."""
    svc = service_of(request)
    backoff = svc.auth.backoff
    source = client_source(request)
    wait = backoff.retry_after(source)
    if wait:
        svc.metrics.auth_failures.labels("RATE_LIMITED").inc()
        # debug: a guesser hammering a blocked address must not flood the log (the block's start is a warning)
        log.debug("auth_throttled", source=source, path=request.path, retry_after_s=wait)
        raise _throttled(wait)
    try:
        return await svc.auth.authenticate(request, allow_temp=allow_temp, spend_temp=spend_temp)
    except AuthError as e:
        svc.metrics.auth_failures.labels(e.code).inc()
        blocked = backoff.failed(source) if e.code in COUNTED_CODES else 0
        if blocked:
            log.warning("auth_backoff", source=source, path=request.path, code=e.code, blocked_s=blocked)
        else:
            log.info("auth_refused", source=source, path=request.path, code=e.code)
        raise web.HTTPUnauthorized(text=json.dumps(e.to_dict()), content_type="application/json",
                                   headers={"WWW-Authenticate": "Bearer"}) from None


async def read_json(request: web.Request) -> Any:
    """The request body as JSON (bounded by `parse_json`), or 400 INVALID_REQUEST saying why."""
    try:
        return parse_json(await request.read())
    except JsonInputError as e:
        raise bad_request(f"the body is not acceptable JSON: {e}") from None


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
