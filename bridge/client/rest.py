"""Async clients for the jobs and webhooks REST APIs (`/v1/jobs...`, `/v1/webhooks...`).

    async with JobsClient("http://127.0.0.1:8080", api_key) as c:
        async for job in c.iter_jobs(status="completed"):
            print(job["id"], await c.transcript(job["id"], "txt"))

    async with WebhooksClient("http://127.0.0.1:8080", api_key) as c:
        hook = await c.create("https://crm.internal/callbridge", events=["final", "call_ended"])
        print(hook["id"], hook["secret"])  # the secret is shown only in this answer

Every non-2xx answer raises `ApiError` with the server's error code; network failures surface
as aiohttp's `ClientError` so callers can tell "the server said no" from "no server".
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp

from bridge.client.errors import ApiError

__all__ = ["TRANSCRIPT_FORMATS", "ApiError", "JobsClient", "WebhooksClient"]

TRANSCRIPT_FORMATS = ("json", "txt", "srt", "vtt")
_CHUNK = 1 << 16


def _since_param(since: float | str | datetime) -> str:
    """The API takes unix seconds or ISO 8601 text; a datetime is sent as unix seconds, so a naive
    one means local time as everywhere in Python (the server reads naive ISO text as UTC)."""
    if isinstance(since, datetime):
        return repr(since.timestamp())
    return str(since)


class _RestClient:
    """One aiohttp session per client; use it as an async context manager (or call `close()`).
    Subclasses name their collection (`_PATH`) and what one item is (`_ITEM`, for errors)."""

    _PATH = ""
    _ITEM = ""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 30.0,
                 session: aiohttp.ClientSession | None = None) -> None:
        if not api_key:
            raise ValueError("an API key is required")
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> Self:
        self._ensure_session()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    def _url(self, item_id: str | None = None, tail: str = "") -> str:
        url = self.base_url + self._PATH
        if item_id is not None:
            if not item_id:
                raise ValueError(f"{self._ITEM} id must not be empty")
            url += "/" + quote(item_id, safe="")
        return url + tail

    @staticmethod
    async def _raise_for(resp: aiohttp.ClientResponse) -> None:
        if resp.status < 300:
            return
        text = await resp.text(errors="replace")
        try:
            body: Any = await resp.json(content_type=None)
        except ValueError:
            body = None
        raise ApiError.from_body(resp.status, body, text)

    async def _request(self, method: str, url: str, **kw: Any) -> aiohttp.ClientResponse:
        """The response, already checked for a 2xx status; the caller reads and releases it."""
        resp = await self._ensure_session().request(method, url, headers=self._headers, **kw)
        try:
            await self._raise_for(resp)
        except BaseException:
            resp.release()
            raise
        return resp

    async def _json(self, method: str, url: str, **kw: Any) -> Any:
        resp = await self._request(method, url, **kw)
        async with resp:
            return await resp.json(content_type=None)

    async def _no_body(self, method: str, url: str, **kw: Any) -> None:
        """For answers without a body worth reading (DELETE's 204)."""
        resp = await self._request(method, url, **kw)
        resp.release()


class JobsClient(_RestClient):
    """The jobs API: list, read, edit, export and delete jobs and their audio."""

    _PATH = "/v1/jobs"
    _ITEM = "job"

    # -- the API -------------------------------------------------------------------------------

    async def list_jobs(self, *, status: str | None = None, source: str | None = None,
                        since: float | str | datetime | None = None, limit: int | None = None,
                        cursor: str | None = None) -> dict[str, Any]:
        """One page: `{"jobs": [...], "next": cursor or None}`, newest first."""
        params: dict[str, str] = {}
        if status is not None:
            params["status"] = status
        if source is not None:
            params["source"] = source
        if since is not None:
            params["since"] = _since_param(since)
        if limit is not None:
            params["limit"] = str(limit)
        if cursor:
            params["cursor"] = cursor
        return await self._json("GET", self._url(), params=params)

    async def iter_jobs(self, *, status: str | None = None, source: str | None = None,
                        since: float | str | datetime | None = None,
                        page_size: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every matching job, newest first, fetching pages as the caller consumes them."""
        cursor: str | None = None
        while True:
            page = await self.list_jobs(status=status, source=source, since=since, limit=page_size,
                                        cursor=cursor)
            for job in page["jobs"]:
                yield job
            cursor = page.get("next")
            if not cursor:
                return

    async def get_job(self, job_id: str) -> dict[str, Any]:
        """The job with its segments (`transcript_path`/`audio_path` are REST paths)."""
        return await self._json("GET", self._url(job_id))

    async def edit_job(self, job_id: str, segments: list[dict[str, Any]] | None = None,
                       speakers: dict[str, str] | None = None) -> dict[str, Any]:
        """Edit segments (`[{"id", "text"?, "speaker"?}]`) and/or relabel speakers (`{old: new}`);
        returns the updated job. The server applies all of it or, on a 400, none of it."""
        body: dict[str, Any] = {}
        if segments:
            body["segments"] = segments
        if speakers:
            body["speakers"] = speakers
        if not body:
            raise ValueError("nothing to edit: give segments and/or speakers")
        return await self._json("PATCH", self._url(job_id), json=body)

    async def delete_job(self, job_id: str) -> None:
        """Delete the job, its transcript and its audio."""
        await self._no_body("DELETE", self._url(job_id))

    async def transcript(self, job_id: str, format: str = "json", *, raw: bool = False) -> str | dict[str, Any]:
        """The transcript export: a dict for json (unless `raw`), else the text of the txt/srt/vtt file."""
        fmt = format.lower()
        if fmt not in TRANSCRIPT_FORMATS:
            raise ValueError(f"format must be one of {TRANSCRIPT_FORMATS}, got {format!r}")
        resp = await self._request("GET", self._url(job_id, "/transcript"), params={"format": fmt})
        async with resp:
            text = await resp.text(encoding="utf-8")
        if fmt == "json" and not raw:
            return json.loads(text)
        return text

    async def download_audio(self, job_id: str, path: str | os.PathLike[str]) -> Path:
        """Stream the WAV to `path` (via a temporary file in the same folder, so a failed download
        never leaves a truncated file under the final name). Returns the path."""
        dest = Path(path)
        resp = await self._request("GET", self._url(job_id, "/audio"))
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            async with resp:
                with os.fdopen(fd, "wb") as fh:
                    async for chunk in resp.content.iter_chunked(_CHUNK):
                        fh.write(chunk)
            os.replace(tmp, dest)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return dest


def _present(**fields: Any) -> dict[str, Any]:
    """The fields that were given: None means "not given", so "" and False still count."""
    return {k: v for k, v in fields.items() if v is not None}


class WebhooksClient(_RestClient):
    """The webhooks API of the key: endpoints, their delivery log, redelivery and test pings.

    An endpoint's secret is in the answer to `create` (and to an `update` that sets one) only;
    other reads carry `secret_hint`, its last four characters.
    """

    _PATH = "/v1/webhooks"
    _ITEM = "webhook"

    async def create(self, url: str, *, secret: str | None = None, events: Iterable[str] | None = None,
                     sources: Iterable[str] | None = None, description: str | None = None,
                     enabled: bool | None = None) -> dict[str, Any]:
        """Register an endpoint; left-out fields take the server's defaults (a generated
        `whsec_...` secret, the default events, every source). Returns it with its `secret`."""
        body = _present(url=url, secret=secret, events=None if events is None else list(events),
                        sources=None if sources is None else list(sources), description=description,
                        enabled=enabled)
        return await self._json("POST", self._url(), json=body)

    async def list(self) -> list[dict[str, Any]]:
        """Every endpoint of the key, without secrets (there is no paging: a key has few)."""
        return (await self._json("GET", self._url()))["webhooks"]

    async def get(self, webhook_id: str) -> dict[str, Any]:
        return await self._json("GET", self._url(webhook_id))

    async def update(self, webhook_id: str, **fields: Any) -> dict[str, Any]:
        """Change the given fields (url, secret, events, sources, description, enabled; None
        leaves one as it is). Returns the endpoint, with `secret` only if this set it."""
        body = _present(**fields)
        if not body:
            raise ValueError("nothing to change: give url, secret, events, sources, description or enabled")
        return await self._json("PATCH", self._url(webhook_id), json=body)

    async def delete(self, webhook_id: str) -> None:
        """Delete the endpoint with its delivery log; its pending deliveries are not sent."""
        await self._no_body("DELETE", self._url(webhook_id))

    async def deliveries(self, webhook_id: str, status: str | None = None, job_id: str | None = None,
                         limit: int | None = None, cursor: str | None = None) -> dict[str, Any]:
        """One page of the delivery log: `{"deliveries": [...], "next": cursor or None}`, newest first."""
        params = {k: str(v) for k, v in _present(status=status, job_id=job_id, limit=limit).items()}
        if cursor:
            params["cursor"] = cursor
        return await self._json("GET", self._url(webhook_id, "/deliveries"), params=params)

    async def iter_deliveries(self, webhook_id: str, status: str | None = None, job_id: str | None = None,
                              page_size: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every matching delivery, newest first, fetching pages as the caller consumes them."""
        cursor: str | None = None
        while True:
            page = await self.deliveries(webhook_id, status, job_id, page_size, cursor)
            for d in page["deliveries"]:
                yield d
            cursor = page.get("next")
            if not cursor:
                return

    async def delivery(self, webhook_id: str, delivery_id: int | str) -> dict[str, Any]:
        """One delivery with its attempts' outcome and the event it carries."""
        return await self._json("GET", self._url(webhook_id, f"/deliveries/{quote(str(delivery_id), safe='')}"))

    async def redeliver(self, webhook_id: str, delivery_id: int | str) -> int:
        """Queue one delivery again, whatever its status; returns how many were queued (1)."""
        tail = f"/deliveries/{quote(str(delivery_id), safe='')}/redeliver"
        return (await self._json("POST", self._url(webhook_id, tail)))["redelivered"]

    async def redeliver_dead(self, webhook_id: str) -> int:
        """Queue every dead delivery of the endpoint again (once the receiver is fixed); returns how many."""
        return (await self._json("POST", self._url(webhook_id, "/redeliver")))["redelivered"]

    async def test(self, webhook_id: str) -> dict[str, Any]:
        """Have the server POST a signed ping now: `{"delivered", "event_id", "http_status", "error", "ms"}`."""
        return await self._json("POST", self._url(webhook_id, "/test"))
