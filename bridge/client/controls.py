"""The control messages a client sends mid-session, shared by the socket and WebRTC clients
(the same JSON on the ingest WebSocket and on the WebRTC "events" data channel)."""

from __future__ import annotations

from typing import Any


class SessionControls:
    """Mixin: the class provides `async send_json(obj)`."""

    async def send_json(self, obj: dict[str, Any]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def keep_alive(self) -> None:
        await self.send_json({"type": "keep_alive"})

    async def force_endpoint(self) -> None:
        await self.send_json({"type": "force_endpoint"})

    async def configure(self, endpointing_ms: int) -> None:
        await self.send_json({"type": "configure", "endpointing_ms": endpointing_ms})
