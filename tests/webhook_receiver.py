"""Real HTTP receivers on loopback for webhook tests: one that records every POST and can be down
or failing, and one that accepts connections and never answers (a hanging CRM)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from bridge.webhooks.signing import verify
from sip.ports import free_sip_port

# Receivers here listen on 127.0.0.1, which key-owned endpoints may reach only when the operator
# allows it: the start_server overrides of every test that registers one through the API.
ALLOW_LOOPBACK = {"webhooks.allow_private_targets": "true"}


@dataclass
class Hit:
    headers: dict[str, str]
    body: bytes
    status: int = 200  # what the receiver answered
    at: float = field(default_factory=time.monotonic)

    @property
    def event(self) -> dict:
        return json.loads(self.body)

    def verifies(self, secret: str) -> bool:
        return verify(secret, self.headers.get("X-Timestamp"), self.body, self.headers.get("X-Signature"))


class Receiver:
    """POST /hook answers `status` (200 by default) and records the request: in `hits` when it
    answered 2xx (delivered), in `requests` whatever it answered. Not listening while stopped,
    so the service sees connection refused, as with a receiver that is down."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_sip_port()  # below the ephemeral range: not taken while we are down
        self.hits: list[Hit] = []
        self.requests: list[Hit] = []
        self.status = 200
        # a request `hold(hit)` picks is kept in `held`, unanswered, until `released` is set (a
        # receiver slow for one job, or an attempt that hangs while its lease runs out); it is
        # then answered with the `status` of that moment
        self.hold: Callable[[Hit], bool] | None = None
        self.held: list[Hit] = []
        self.released = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._arrived = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        hit = Hit(dict(request.headers), body, self.status)
        if self.hold is not None and self.hold(hit):
            self.held.append(hit)
            self._arrived.set()
            await self.released.wait()
            hit.status, hit.at = self.status, time.monotonic()
        self.requests.append(hit)
        if self.status // 100 == 2:
            self.hits.append(hit)
        self._arrived.set()
        return web.Response(status=self.status, text="ok" if self.status < 300 else "receiver says no")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def events(self, job_id: str | None = None) -> list[dict]:
        return [h.event for h in self.hits if job_id is None or h.event.get("job_id") == job_id]

    async def wait_for(self, pred, timeout: float = 60.0) -> None:
        """Until `pred(self)` holds; bounded."""
        async def loop() -> None:
            while not pred(self):
                self._arrived.clear()
                await self._arrived.wait()

        await asyncio.wait_for(loop(), timeout)

    def ended(self, job_id: str) -> bool:
        return any(e["type"] == "call_ended" for e in self.events(job_id))


class HangingReceiver:
    """Accepts TCP connections on loopback and never answers (nor closes): every attempt to it
    lasts the service's whole timeout. `connections` counts the accepted ones."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        await reader.read(1 << 16)  # take the request, then say nothing until the peer gives up
        await reader.read()

    async def start(self) -> HangingReceiver:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in self._writers:
                w.close()
            await self._server.wait_closed()
            self._server = None
