"""`GET /openapi.json`: served without a credential, a valid OpenAPI 3.1 document, it lists
exactly the routes the real app registers, with the same methods, and the real service's answers
(statuses, bodies, Retry-After) are the ones it describes."""

from __future__ import annotations

import socket
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from bridge.api.openapi import PATH
from tests.serving import API_KEY, start_server
from tests.test_auth import _from
from tests.test_storage_full import MiB, fill, tmpfs  # noqa: F401 - tmpfs is a fixture
from tests.test_webrtc import _offer_sdp

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def app_routes(app) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route the app serves; HEAD is aiohttp's twin of each GET."""
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD" and path:
            out.add((route.method, path))
    return out


async def fetch_document(server) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + PATH) as r:  # no credential
            return r.status, await r.json()


async def test_document_is_served_without_a_credential_and_is_valid_openapi_3_1(server):
    status, doc = await fetch_document(server)
    assert status == 200 and doc["openapi"].startswith("3.1")
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema, including unresolved $refs


async def test_document_lists_exactly_the_routes_of_the_app(server):
    _, doc = await fetch_document(server)
    documented = {(m.upper(), path) for path, item in doc["paths"].items() for m in item if m in METHODS}
    served = app_routes(server.runner.app)
    assert served - documented == set(), "routes missing from /openapi.json"
    assert documented - served == set(), "documented routes the app does not serve"
    # path parameters are declared with the names the routes use
    for path, item in doc["paths"].items():
        names = {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
        for method, op in item.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (method, path)


async def test_public_routes_are_documented_as_needing_no_credential(server):
    _, doc = await fetch_document(server)
    public = {path for path, item in doc["paths"].items() if item.get("get", {}).get("security") == []}
    assert {"/healthz", "/metrics", PATH} <= public
    async with aiohttp.ClientSession() as http:
        for path in public - {"/static/{name}"}:
            async with http.get(server.url + path) as r:
                assert r.status != 401, path
        async with http.get(server.url + "/v1/jobs") as r:  # and a protected one does refuse
            assert r.status == 401


# --------------------------------------------------------------------------- real answers vs the document
#
# The document is written by hand, so it drifts when a handler changes what it returns. These tests
# drive the real service into each kind of answer (success, refusals, the auth backoff, a full disk)
# and check every answer against the document: its status is listed for that route, its body
# validates against the schema listed for that status, with every object closed (a field the
# handler returns that the schema does not name is drift too), and a Retry-After header is listed
# where one is sent (and sent where the document requires it).


def _closed(schema: Any) -> Any:
    """A copy where every object schema that names its properties allows no others."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class Conformance:
    """Checks real answers against the document and records which (method, route, status) it saw."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.components = _closed(doc["components"])
        self.seen: set[tuple[str, str, int]] = set()

    def _resolve(self, obj: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in obj:
            node: Any = self.doc
            for part in obj["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            obj = node
        return obj

    def check(self, method: str, route: str, status: int, headers: Any, body: Any) -> None:
        op = self.doc["paths"][route][method.lower()]
        where = f"{method} {route} -> {status}"
        assert str(status) in op["responses"], f"{where}: the status is not documented ({body})"
        self.seen.add((method, route, status))
        resp = self._resolve(op["responses"][str(status)])
        documented = {name.lower(): self._resolve(h) for name, h in resp.get("headers", {}).items()}
        if "retry-after" in {h.lower() for h in headers}:
            assert "retry-after" in documented, f"{where}: sends Retry-After, which is not documented"
        for name, h in documented.items():
            if h.get("required"):
                assert name in {k.lower() for k in headers}, f"{where}: {name} is documented as always sent"
        if body is None:
            return
        content = resp.get("content") or {}
        assert "application/json" in content, f"{where}: answered JSON, documented {sorted(content)}"
        schema = {**_closed(content["application/json"]["schema"]), "components": self.components}
        errors = sorted(Draft202012Validator(schema).iter_errors(body), key=lambda e: list(e.absolute_path))
        assert not errors, f"{where}: the body does not match the document: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}" for e in errors[:5])

    async def call(self, http: aiohttp.ClientSession, method: str, url: str, route: str,
                   **kwargs: Any) -> tuple[int, Any]:
        """One real request; checks its answer and returns (status, parsed JSON body or None)."""
        async with http.request(method, url, **kwargs) as r:
            body = await r.json() if r.content_type == "application/json" else None
            self.check(method, route, r.status, r.headers, body)
            return r.status, body

    async def refused_handshake(self, http: aiohttp.ClientSession, url: str, route: str, **kwargs: Any) -> int:
        """A WebSocket handshake the server refuses before the upgrade; its status must be documented."""
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            async with http.ws_connect(url, **kwargs):
                pass
        self.check("GET", route, e.value.status, e.value.headers or {}, None)
        return e.value.status


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_real_answers_match_the_document(tmp_path, pool):
    """Successes and refusals of the REST routes and sockets, the capacity refusal of an offer,
    temporary tokens refused on the event sockets, then the auth backoff from one address: every
    answer validates against the document."""
    srv = await start_server(tmp_path / "data", pool, **{
        "capacity.max_legs": "1", "webhooks.allow_private_targets": "true",
        "auth.failures_before_backoff": "2", "auth.backoff_initial_s": "600", "auth.backoff_max_s": "600"})
    key = _bearer(API_KEY)
    try:
        async with aiohttp.ClientSession() as http:
            doc = (await fetch_document(srv))[1]
            c = Conformance(doc)
            u = srv.url
            status, health = await c.call(http, "GET", u + "/healthz", "/healthz")
            assert status == 200 and health["status"] == "ok" and health["capacity"]["legs_capacity"] == 1

            # webhooks: create, list, one, its ping (to a closed port) and its log
            free = socket.socket()
            free.bind(("127.0.0.1", 0))
            closed_url = f"http://127.0.0.1:{free.getsockname()[1]}/hook"
            free.close()
            status, hook = await c.call(http, "POST", u + "/v1/webhooks", "/v1/webhooks", headers=key,
                                        json={"url": closed_url, "events": ["call_ended"]})
            assert status == 201 and hook["circuit"]["state"] == "closed"
            status, listed = await c.call(http, "GET", u + "/v1/webhooks", "/v1/webhooks", headers=key)
            assert status == 200 and listed["delivering"] is True and len(listed["webhooks"]) == 1
            one = "/v1/webhooks/{webhook_id}"
            assert (await c.call(http, "GET", f"{u}/v1/webhooks/{hook['id']}", one, headers=key))[0] == 200
            status, ping = await c.call(http, "POST", f"{u}/v1/webhooks/{hook['id']}/test", one + "/test",
                                        headers=key)
            assert status == 200 and ping["delivered"] is False
            assert (await c.call(http, "GET", f"{u}/v1/webhooks/{hook['id']}/deliveries", one + "/deliveries",
                                 headers=key))[0] == 200
            assert (await c.call(http, "PATCH", f"{u}/v1/webhooks/{hook['id']}", one, headers=key,
                                 json={"events": ["nope"]}))[0] == 400

            # jobs and tokens
            assert (await c.call(http, "GET", u + "/v1/jobs", "/v1/jobs", headers=key))[0] == 200
            assert (await c.call(http, "GET", u + "/v1/jobs/job_nope", "/v1/jobs/{job_id}", headers=key))[0] == 404
            status, minted = await c.call(http, "POST", u + "/v1/tokens", "/v1/tokens", headers=key)
            assert status == 201

            # the event sockets refuse a temporary token (not spent) and bad requests before the upgrade
            assert (await c.call(http, "GET", u + "/v1/events", "/v1/events",
                                 params={"token": minted["token"]}))[0] == 401
            assert await c.refused_handshake(http, u + "/v1/events", "/v1/events",
                                             params={"token": minted["token"]}) == 401
            assert (await c.call(http, "GET", u + "/v1/events", "/v1/events", headers=key,
                                 params={"source": "fax"}))[0] == 400
            assert (await c.call(http, "GET", u + "/v1/calls/job_nope/events", "/v1/calls/{job_id}/events",
                                 headers=key))[0] == 404
            assert (await c.call(http, "GET", u + "/v1/transcription/stream", "/v1/transcription/stream",
                                 headers=key))[0] == 426

            # WebRTC offers: a bad body, then the capacity refusal while a stream holds the one leg
            offer = "/v1/webrtc/offer"
            status, bad = await c.call(http, "POST", u + offer, offer, headers=key, json={"sdp": 1})
            assert status == 400 and bad["error"]["code"] == "INVALID_CONFIG"
            async with http.ws_connect(srv.ws_url, params={"api_key": API_KEY}) as ws:
                await ws.send_json({"type": "start"})
                assert (await ws.receive_json(timeout=15))["type"] == "ready"
                status, full = await c.call(http, "POST", u + offer, offer, headers=key,
                                            json={"sdp": await _offer_sdp(), "type": "offer"})
                assert status == 503 and full["error"]["code"] == "RATE_LIMITED" and full["error"]["retry_after_s"]
                await ws.send_json({"type": "end"})
                async for _ in ws:
                    pass
            # the token opens one ingest session: an offer with it is answered, the call is live
            status, answer = await c.call(http, "POST", u + offer + f"?token={minted['token']}", offer,
                                          json={"sdp": await _offer_sdp(), "type": "offer"})
            assert status == 200 and answer["job_id"] and answer["session_id"], answer

        # the auth backoff, from an address of its own: two refused keys start a block
        wrong = _bearer("cbk_wrong_key_guess_0000000000000000")
        async with _from("127.0.0.2") as guesser:
            for _ in range(2):
                status, refused = await c.call(guesser, "GET", u + "/v1/jobs", "/v1/jobs", headers=wrong)
                assert status == 401 and refused["error"]["code"] == "INVALID_CREDENTIALS"
            for method, path, route in [("GET", "/v1/jobs", "/v1/jobs"), ("POST", "/v1/tokens", "/v1/tokens"),
                                        ("POST", offer, offer), ("GET", "/v1/webhooks", "/v1/webhooks"),
                                        ("GET", "/v1/events", "/v1/events"),
                                        ("GET", "/v1/calls/job_x/events", "/v1/calls/{job_id}/events"),
                                        ("GET", "/v1/transcription/stream", "/v1/transcription/stream")]:
                status, body = await c.call(guesser, method, u + path, route, headers=key)  # the valid key
                assert status == 429 and body["error"]["code"] == "RATE_LIMITED", (path, body)
            for path in ("/v1/events", "/v1/calls/job_x/events", "/v1/transcription/stream"):
                route = "/v1/calls/{job_id}/events" if "calls" in path else path
                assert await c.refused_handshake(guesser, u + path, route, params={"api_key": API_KEY}) == 429
        assert {s for m, r, s in c.seen} >= {200, 201, 400, 401, 404, 426, 429, 503}
    finally:
        await srv.stop()


async def test_degraded_health_and_storage_refusals_match_the_document(tmp_path, pool):
    """Under the free-space reserve: /healthz is 200 `degraded` with its `disk`, an offer 507."""
    srv = await start_server(tmp_path / "data", pool, **{"limits.min_free_disk_mb": str(1 << 40)})
    try:
        async with aiohttp.ClientSession() as http:
            c = Conformance((await fetch_document(srv))[1])
            status, health = await c.call(http, "GET", srv.url + "/healthz", "/healthz")
            assert status == 200 and health["status"] == "degraded" and health["disk"]["status"] == "low"
            status, body = await c.call(http, "POST", srv.url + "/v1/webrtc/offer", "/v1/webrtc/offer",
                                        headers=_bearer(API_KEY), json={"sdp": await _offer_sdp(), "type": "offer"})
            assert status == 507 and body["error"]["code"] == "STORAGE_FULL"
    finally:
        await srv.stop()


async def test_a_rest_write_on_a_full_disk_matches_the_document(tmpfs, pool):
    """A full disk (a real tmpfs, filled): REST writes answer 507 STORAGE_FULL, as documented."""
    data = tmpfs(16 * MiB)
    srv = await start_server(data, pool, **{"limits.min_free_disk_mb": "0",
                                            "webhooks.allow_private_targets": "true"})
    key = _bearer(API_KEY)
    try:
        async with aiohttp.ClientSession() as http:
            c = Conformance((await fetch_document(srv))[1])
            filler = fill(data)
            statuses = set()
            for _ in range(20):  # SQLite may have a free page or two left; each write takes more
                status, _ = await c.call(http, "POST", srv.url + "/v1/webhooks", "/v1/webhooks", headers=key,
                                         json={"url": "http://127.0.0.1:9/hook", "description": "x" * 400})
                statuses.add(status)
                if status == 507:
                    break
            assert 507 in statuses, statuses
            filler.unlink()
    finally:
        await srv.stop()
