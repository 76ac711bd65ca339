"""The captions demo page: `/` and its few static files from bridge/web/ (plain HTML/JS/CSS).

Only the files shipped in bridge/web/ with a known extension are served, looked up by exact
name, so no request path can reach anything else. Files are read per request (they are a few
kB) so that an upgrade or an edit shows without a restart; `no-cache` makes browsers revalidate.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from aiohttp import web

from bridge.api.http import json_error

__all__ = ["CONTENT_TYPES", "add_routes", "web_dir"]

CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
}

# The page talks only to this service; no inline script, no CDN. `blob:` is for export downloads
# and for the job link opened from a Blob.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; media-src 'self' blob:; object-src 'none'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'")
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # The page URL may carry ?api_key=...: never leak it in a Referer.
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": _CSP,
}


def web_dir() -> Path:
    return Path(str(resources.files("bridge").joinpath("web")))


def _static_files() -> dict[str, Path]:
    root = web_dir()
    if not root.is_dir():
        return {}
    return {p.name: p for p in root.iterdir() if p.is_file() and p.suffix in CONTENT_TYPES}


def _serve(path: Path) -> web.Response:
    try:
        body = path.read_bytes()
    except OSError:
        return json_error(404, "NOT_FOUND", f"{path.name} is not available")
    return web.Response(body=body, content_type=CONTENT_TYPES[path.suffix], charset="utf-8", headers=_HEADERS)


def add_routes(app: web.Application) -> None:
    files = _static_files()

    async def index(request: web.Request) -> web.Response:
        if "index.html" not in files:
            return json_error(404, "NOT_FOUND", "the demo page is not installed")
        return _serve(files["index.html"])

    async def static(request: web.Request) -> web.Response:
        path = files.get(request.match_info["name"])
        if path is None:
            return json_error(404, "NOT_FOUND", f"no static file {request.match_info['name']!r}")
        return _serve(path)

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
