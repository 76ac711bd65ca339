"""The real service, in this process, on a free loopback port: what the ingress benchmarks call."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

BENCH_KEY = "cbk_bench_0123456789abcdef0123456789"
# Capacity admission off (bridge/admission.py): for benchmarks that measure a fixed offered load,
# which a refusal would change. bench.capacity --offer measures admission itself.
ADMIT_ALL = {"capacity.max_legs": "100000", "capacity.max_final_latency_s": "1e9"}


@contextlib.asynccontextmanager
async def running_service(data_dir: Path, **overrides: str) -> AsyncIterator[tuple[Any, str]]:
    """(Service, base URL), on embedded defaults plus `overrides` (dotted config keys as text),
    with the bench key and no per-key session cap; logs at warning so tables stay readable."""
    from aiohttp import web

    from bridge.config import load_config
    from bridge.logs import configure_logging
    from bridge.service import Service

    configure_logging("console", "warning")
    config = load_config({"data_dir": str(data_dir), "server.api_keys": BENCH_KEY,
                          "limits.max_sessions_per_key": "100", "logging.level": "warning", **overrides}, env={})
    svc = Service(config)
    runner = web.AppRunner(svc.build_app())
    await runner.setup()  # starts the service; cleanup() stops it
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield svc, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()
