"""`GET /openapi.json`: served without a credential, a valid OpenAPI 3.1 document, and it lists
exactly the routes the real app registers, with the same methods."""

from __future__ import annotations

import aiohttp
from openapi_spec_validator import validate

from bridge.api.openapi import PATH

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
