"""Where the server is and which key to use, for the commands that talk to a running server
(`stream`, `jobs`): flags, else CALLBRIDGE_URL / CALLBRIDGE_API_KEY, else the key `serve` wrote."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from bridge.auth import KEY_FILE_NAME as KEY_FILE

__all__ = ["DEFAULT_URL", "KEY_FILE", "PROG", "resolve_api_key", "resolve_url"]

PROG = "callbridge"
DEFAULT_URL = "http://127.0.0.1:8080"


def _usage_error(message: str) -> Exception:
    # Imported late: bridge.cli imports this module to register the group.
    from bridge.cli import UsageError

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
