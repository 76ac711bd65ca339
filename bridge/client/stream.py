"""Streaming client in the hosted SDKs' shape: an async context manager you send audio into and
iterate events out of.

    async with StreamClient(url, api_key=KEY, sample_rate=8000, encoding="pcm_mulaw") as s:
        await s.send_audio(chunk)          # bytes in the declared encoding, or int16 numpy
        await s.end()                      # flush: the remaining finals, then `completed`
        async for event in s:              # dicts, exactly the server's frames
            ...

Iteration ends after `completed` or `error` (also kept as `.completed` / `.error`) or a close.
Sending and iterating may run in different tasks at the same time. A server that shuts down ends
live sessions itself: `completed` (what it received is saved), then close 1001; `.cut_short` tells
that apart from a session that ended because the client sent `end`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
import numpy as np

from .controls import SessionControls
from .errors import ApiError

__all__ = ["CLOSE_GOING_AWAY", "StreamClient", "StreamError", "ws_url"]

STREAM_PATH = "/v1/transcription/stream"
CLOSE_GOING_AWAY = 1001  # docs/stream.md, "Shutdown": the server ended the session, not the client


class StreamError(Exception):
    """The server refused or ended the session with an `error` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def ws_url(base: str) -> str:
    """http(s)://host:port[/...] or ws(s)://... -> the ingest socket URL."""
    parts = urlsplit(base if "://" in base else f"http://{base}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if not path.endswith(STREAM_PATH):
        path += STREAM_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class StreamClient(SessionControls):
    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        token: str | None = None,
        sample_rate: int = 16000,
        channels: int = 1,
        encoding: str = "pcm_s16le",
        language: str | None = None,
        interim_results: bool = True,
        endpointing_ms: int | None = None,
        word_boost: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        max_duration_seconds: float | None = None,
        extra: dict[str, Any] | None = None,
        connect_timeout_s: float = 30.0,
    ) -> None:
        self.url = ws_url(url)
        self._query = {"token": token} if token else {}
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        start: dict[str, Any] = {"type": "start", "sample_rate": sample_rate, "channels": channels,
                                 "encoding": encoding, "interim_results": interim_results}
        for k, v in (("language", language), ("endpointing_ms", endpointing_ms), ("word_boost", word_boost),
                     ("metadata", metadata), ("max_duration_seconds", max_duration_seconds)):
            if v is not None:
                start[k] = v
        start.update(extra or {})
        self.start_frame = start
        self.connect_timeout_s = connect_timeout_s
        self.ready: dict[str, Any] | None = None
        self.completed: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.close_code: int | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ended = False

    @property
    def job_id(self) -> str | None:
        return self.ready["job_id"] if self.ready else None

    @property
    def cut_short(self) -> bool:
        """The server shut down and ended the session before the client's `end` (close 1001,
        `completed.server_shutdown`): `completed` then covers only the audio the server received."""
        return self.close_code == CLOSE_GOING_AWAY or bool((self.completed or {}).get("server_shutdown"))

    async def __aenter__(self) -> "StreamClient":
        self._http = aiohttp.ClientSession()
        url = self.url + (("&" if "?" in self.url else "?") + urlencode(self._query) if self._query else "")
        try:
            self._ws = await self._http.ws_connect(url, headers=self._headers, max_msg_size=0,
                                                   timeout=aiohttp.ClientWSTimeout(ws_close=10))
        except aiohttp.WSServerHandshakeError as e:
            body = await self._refusal_body(url)
            await self._http.close()
            err = body.get("error", {}) if isinstance(body, dict) else {}
            raise ApiError(e.status, err.get("code", "HANDSHAKE_FAILED"), err.get("message", e.message)) from None
        except BaseException:
            await self._http.close()
            raise
        await self._ws.send_str(json.dumps(self.start_frame))
        first = await asyncio.wait_for(self._next(), self.connect_timeout_s)
        if first is None or first.get("type") != "ready":
            await self.aclose()
            if first and first.get("type") == "error":
                raise StreamError(first.get("code", "?"), first.get("message", ""))
            raise StreamError("PROTOCOL", f"expected ready, got {first!r} (close code {self.close_code})")
        self.ready = first
        return self

    async def _refusal_body(self, url: str) -> Any:
        """The JSON body of a refused upgrade (aiohttp's handshake error drops it)."""
        assert self._http is not None
        try:
            async with self._http.get(url.replace("ws", "http", 1), headers=self._headers) as r:
                return await r.json(content_type=None)
        except Exception:  # noqa: BLE001 - the status from the handshake is enough
            return {}

    async def __aexit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None and not self._ended and self._ws is not None and not self._ws.closed:
            await self.end()
            async for _ in self:
                pass
        await self.aclose()

    async def aclose(self) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()

    # -- sending -------------------------------------------------------------------------------
    async def send_audio(self, audio: bytes | bytearray | memoryview | np.ndarray) -> None:
        assert self._ws is not None, "use `async with`"
        if isinstance(audio, np.ndarray):
            audio = np.ascontiguousarray(audio, dtype="<i2").tobytes()
        await self._ws.send_bytes(bytes(audio))

    async def send_json(self, obj: dict[str, Any]) -> None:
        assert self._ws is not None, "use `async with`"
        await self._ws.send_str(json.dumps(obj))

    async def end(self) -> None:
        """Ask the server to flush, finalize and save; `completed` follows the last finals."""
        if not self._ended:
            self._ended = True
            await self.send_json({"type": "end"})

    # -- receiving -----------------------------------------------------------------------------
    async def _next(self) -> dict[str, Any] | None:
        assert self._ws is not None
        while True:
            msg = await self._ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                return json.loads(msg.data)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                self.close_code = self._ws.close_code
                return None

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        if self.completed is not None or self.error is not None:
            return
        while True:
            ev = await self._next()
            if ev is None:
                return
            t = ev.get("type")
            if t == "completed":
                self.completed = ev
            elif t == "error":
                self.error = ev
            yield ev
            if t in ("completed", "error"):
                self.close_code = (await self._drain_close()) or self.close_code
                return

    async def _drain_close(self) -> int | None:
        assert self._ws is not None
        try:
            await asyncio.wait_for(self._next(), 10)
        except asyncio.TimeoutError:
            pass
        return self._ws.close_code
