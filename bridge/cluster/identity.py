"""A node's identity: a stable id, kept across restarts, and the URL other nodes reach it at.

The id is what the node's jobs and live sessions are marked with, so a restart must come back as
the same node (and fail only its own live jobs): `cluster.node_id` when the operator sets one
(a container whose data directory is not kept), else a random id created once in
`<data_dir>/node_id`.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from bridge.config import Config, ConfigError

__all__ = ["NODE_ID_FILE", "advertise_url", "load_node_id"]

NODE_ID_FILE = "node_id"
_VALID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")


def _checked(node_id: str, source: str) -> str:
    if not _VALID.match(node_id):
        raise ConfigError(f"cluster.node_id must be 1-100 letters, digits, '.', '_', ':' or '-' "
                          f"(from {source}), got {node_id!r}")
    return node_id


def load_node_id(config: Config) -> str:
    """`cluster.node_id`, else the id in data_dir/node_id, created (atomically) on first start."""
    if config.cluster.node_id:
        return _checked(config.cluster.node_id.strip(), "cluster.node_id")
    path = Path(config.server.data_dir) / NODE_ID_FILE
    try:
        return _checked(path.read_text().strip(), str(path))
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{NODE_ID_FILE}.{os.getpid()}")
    tmp.write_text("node_" + secrets.token_hex(8) + "\n")
    try:
        os.link(tmp, path)  # fails if another process created it first: then theirs is the id
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return _checked(path.read_text().strip(), str(path))


def advertise_url(config: Config) -> str:
    """`cluster.advertise_url`, else http://host:http_port (a wildcard bind address says nothing
    to another node: then the host name)."""
    if config.cluster.advertise_url:
        return config.cluster.advertise_url.rstrip("/")
    host = config.server.host
    if host in ("0.0.0.0", "::", ""):
        host = os.uname().nodename
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.server.http_port}"
