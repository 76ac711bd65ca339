"""`POST /v1/tokens`: single-use temporary tokens, so a browser can open one stream without the key.

The caller's backend holds the API key, mints a token per stream and hands it to the browser,
which connects with `?token=cbt_...`. Tokens act as the minting key (its jobs, session limit and
credits), open one stream, and expire after `expires_in` seconds if unused.

Minting needs an API key: a temporary token cannot mint another (that would make it reusable),
and JWT callers are refused with 403, because whoever can sign JWTs can sign a short-lived one
for the browser instead, and a token outliving the JWT that minted it would extend its access.
"""

from __future__ import annotations

from aiohttp import web

from bridge.api.http import http_error, read_json, require_principal, service_of
from bridge.stores import TokenRefused

__all__ = ["DEFAULT_EXPIRES_IN", "MAX_EXPIRES_IN", "MIN_EXPIRES_IN", "add_routes"]

DEFAULT_EXPIRES_IN = 60
MIN_EXPIRES_IN = 60
MAX_EXPIRES_IN = 360000


async def create_token(request: web.Request) -> web.Response:
    principal = await require_principal(request)  # allow_temp=False: 401 for a temporary token
    if principal.key_id is None:
        raise http_error(web.HTTPForbidden, "FORBIDDEN", "temporary tokens are minted with an API key; "
                         "a JWT issuer can sign a short-lived JWT for the browser instead")
    expires_in = await _expires_in(request)
    try:
        token, expires_at = await service_of(request).keys.mint_temp_token(principal.key_id, expires_in)
    except TokenRefused as e:  # the key was revoked between authentication and minting
        raise http_error(web.HTTPUnauthorized, e.code, e.message) from None
    # no-store: the body is a credential, no proxy or browser cache may keep it
    return web.json_response({"token": token, "expires_in": expires_in, "expires_at": round(expires_at, 3)},
                             status=201, headers={"Cache-Control": "no-store"})


async def _expires_in(request: web.Request) -> int:
    """The requested lifetime; an empty body (or no `expires_in`) means the default."""
    body = await read_json(request) if (await request.read()).strip() else {}
    if not isinstance(body, dict):
        raise http_error(web.HTTPBadRequest, "INVALID_REQUEST", "the body must be a JSON object")
    value = body.get("expires_in", DEFAULT_EXPIRES_IN)
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_EXPIRES_IN <= value <= MAX_EXPIRES_IN:
        raise http_error(web.HTTPBadRequest, "INVALID_REQUEST", "expires_in must be an integer number of "
                         f"seconds in {MIN_EXPIRES_IN}..{MAX_EXPIRES_IN}, got {repr(value)[:40]}")
    return value


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/tokens", create_token)
