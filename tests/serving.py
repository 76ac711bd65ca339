"""Start the real service on a free loopback port for a test (real SQLite, real model pool)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from bridge.config import load_config
from bridge.service import Service

API_KEY = "cbk_test_0123456789abcdef0123456789"
OTHER_KEY = "cbk_test_fedcba9876543210fedcba9876"


@dataclass
class RunningServer:
    service: Service
    runner: web.AppRunner
    port: int
    api_key: str = API_KEY

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/transcription/stream"

    async def stop(self) -> None:
        await self.service.drain()
        await self.runner.cleanup()  # stops the service (its app's cleanup_ctx)


async def start_server(data_dir: Path, pool: Any, **overrides: Any) -> RunningServer:
    """`overrides` are dotted config keys as text, e.g. {"limits.idle_timeout_s": "2"}."""
    ov = {"data_dir": str(data_dir), "server.api_keys": f"{API_KEY},{OTHER_KEY}", "logging.format": "console",
          "sip.enabled": "false",  # SIP tests turn it on (workers are processes: slower to start)
          # late finals, or a leg cap following a busy test machine's decode speed, must not refuse
          # sessions of tests about something else; tests/test_capacity.py sets what it tests
          "capacity.max_final_latency_s": "3600", "capacity.legs_per_context": "8"}
    ov.update({k: str(v) for k, v in overrides.items()})
    config = load_config(ov, env={})
    service = Service(config, pool=pool)
    runner = web.AppRunner(service.build_app(), shutdown_timeout=5)
    await runner.setup()  # starts the service
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    if service.heartbeat is not None and not config.cluster.advertise_url:
        service.heartbeat.url = f"http://127.0.0.1:{port}"  # known once bound: what other nodes forward to
        await service.heartbeat.beat()
    return RunningServer(service, runner, port)
