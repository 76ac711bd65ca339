"""A real HTTP receiver on loopback for webhook tests: records every POST, can be down or failing."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from aiohttp import web

from bridge.webhooks.signing import verify
from sip.ports import free_sip_port


@dataclass
class Hit:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict:
        return json.loads(self.body)

    def verifies(self, secret: str) -> bool:
        return verify(secret, self.headers.get("X-Timestamp"), self.body, self.headers.get("X-Signature"))


class Receiver:
    """POST /hook answers `status` (200 by default) and records the request; not listening while
    stopped, so the service sees connection refused, as with a receiver that is down."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_sip_port()  # below the ephemeral range: not taken while we are down
        self.hits: list[Hit] = []
        self.status = 200
        self._runner: web.AppRunner | None = None
        self._arrived = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.status // 100 == 2:
            self.hits.append(Hit(dict(request.headers), body))
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
