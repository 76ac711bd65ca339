"""`callbridge serve`: the service on embedded defaults, until SIGTERM/SIGINT drains it."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import TYPE_CHECKING

from aiohttp import web

from bridge.config import Config, add_config_flags, config_from_args
from bridge.stores import StoreUnavailable

if TYPE_CHECKING:
    from bridge.service import Service


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the service (HTTP+WebSocket API; first start converts the model)")
    add_config_flags(p)
    p.set_defaults(command="serve")


def cmd_serve(args: argparse.Namespace) -> int:
    from bridge.logs import configure_logging

    config = config_from_args(args)
    configure_logging(config.logging.format, config.logging.level)
    return asyncio.run(run_service(config))


async def run_service(config: Config) -> int:
    from bridge.logs import get_logger
    from bridge.service import Service

    log = get_logger("bridge.serve")
    svc = Service(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # the app owns the service's lifecycle: setup() starts it, cleanup() stops it (bridge/service.py)
    runner = web.AppRunner(svc.build_app(), shutdown_timeout=5, access_log=None)
    try:
        await runner.setup()
    except Exception as e:
        if svc.storage.caused(e):
            # a disk too full even for recovery (the emergency reserve was spent): one line, no traceback
            print(f"callbridge: error: cannot start: the data directory {svc.data_dir} is full "
                  f"({_free(svc)} free); free space there and start again", file=sys.stderr)
            return 1
        if isinstance(e, (RuntimeError, StoreUnavailable)):  # SIP workers that cannot start, a database
            print(f"callbridge: error: cannot start: {e}", file=sys.stderr)  # that does not answer, or a
            # schema newer than this code: say why in one line
            return 1
        raise
    host, port = config.server.host, config.server.http_port
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        print(f"callbridge: error: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        await runner.cleanup()
        return 1
    if svc.generated_key:
        # printed once, on the start that created it; later starts find it in data_dir/api_key
        print(f"Created an API key (saved in {svc.data_dir / 'api_key'}):\n  {svc.generated_key}", flush=True)
    print(f"callbridge listening on http://{host}:{port}  (WebSocket ws://{host}:{port}/v1/transcription/stream)",
          flush=True)
    refusal = svc.storage.refusal()
    if refusal is not None:  # started in refuse-mode: REST works (delete jobs to free space)
        print(f"callbridge: warning: {refusal} (limits.min_free_disk_mb)", file=sys.stderr, flush=True)
    if svc.sip is not None:
        print(f"SIP on {host}:{svc.sip.port} (UDP and TCP), {len(svc.sip.workers)} workers x "
              f"{config.sip.calls_per_worker} calls", flush=True)
    log.info("listening", host=host, http_port=port)
    await stop.wait()
    left = await svc.drain()  # while still listening: new sessions get a clear refusal
    await runner.cleanup()
    log.info("exited", unfinished_calls=len(left))
    return 0


def _free(svc: "Service") -> str:
    try:
        return f"{svc.storage.state().free_bytes / 1048576:.1f} MiB"
    except OSError:
        return "unknown"
