"""Where the server is and which key to use, for the commands that talk to a running server
(`stream`, `jobs`, `webhooks`): flags, else CALLBRIDGE_URL / CALLBRIDGE_API_KEY, else the key
`serve` wrote; and how the REST command groups run one client session and report its failure."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from bridge.auth import KEY_FILE_NAME as KEY_FILE
from bridge.client.errors import ApiError
from bridge.commands.usage import UsageError

__all__ = ["DEFAULT_URL", "KEY_FILE", "PROG", "remote_flags", "resolve_api_key", "resolve_url", "run_remote"]

PROG = "callbridge"
DEFAULT_URL = "http://127.0.0.1:8080"
# Answers that mean the user asked for something wrong (exit 2), not that the operation failed (1).
_INPUT_STATUSES = frozenset({400, 401, 403, 404, 422})

_C = TypeVar("_C", bound=AbstractAsyncContextManager[Any])


def _usage_error(message: str) -> Exception:
    return UsageError(message)


def resolve_url(explicit: str | None, env: Mapping[str, str] = os.environ) -> str:
    url = explicit or env.get("CALLBRIDGE_URL") or DEFAULT_URL
    if not url.startswith(("http://", "https://")):
        raise _usage_error(f"--url must start with http:// or https://, got {url!r}")
    return url.rstrip("/")


def resolve_api_key(explicit: str | None, env: Mapping[str, str] = os.environ) -> str:
    """--api-key, else $CALLBRIDGE_API_KEY, else the first line of <data_dir>/api_key."""
    if explicit:
        return explicit.strip()
    if env.get("CALLBRIDGE_API_KEY", "").strip():
        return env["CALLBRIDGE_API_KEY"].strip()
    path = Path(env.get("CALLBRIDGE_DATA_DIR") or "./data") / KEY_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    except OSError as e:
        raise _usage_error(f"cannot read the API key file {path}: {e}") from None
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise _usage_error(f"no API key: pass --api-key, set CALLBRIDGE_API_KEY, or run `{PROG} serve` "
                       f"once so it writes {path}")


def remote_flags() -> argparse.ArgumentParser:
    """The --url/--api-key/--timeout flags, as a parent parser for each REST subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"server base URL (default $CALLBRIDGE_URL or {DEFAULT_URL})")
    common.add_argument("--api-key", help="API key (default $CALLBRIDGE_API_KEY, else <data_dir>/api_key, "
                                          "data_dir being $CALLBRIDGE_DATA_DIR or ./data)")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    return common


def run_remote(args: argparse.Namespace, client_cls: Callable[..., _C], work: Callable[[_C], Awaitable[int]]) -> int:
    """Run one client session; turn API and network failures into a one-line error and exit code."""
    url, key = resolve_url(args.url), resolve_api_key(args.api_key)

    async def go() -> int:
        async with client_cls(url, key, timeout_s=args.timeout) as client:
            return await work(client)

    try:
        return asyncio.run(go())
    except ApiError as e:
        print(f"{PROG}: error: {e.message} ({e.status} {e.code})", file=sys.stderr)
        return 2 if e.status in _INPUT_STATUSES else 1
    except (TimeoutError, aiohttp.ClientError) as e:
        reason = str(e) or type(e).__name__
        print(f"{PROG}: error: cannot reach callbridge at {url}: {reason}", file=sys.stderr)
        return 1
