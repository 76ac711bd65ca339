"""Picking free SIP ports when none are configured (tests, `--sip-port 0`).

Binding port 0 hands out a port from the kernel's ephemeral range, and so does every outgoing
connection and every unbound UDP socket: between picking a port and a worker process binding
it (about a second: Python imports and pjsua start), another socket can take it, and the worker
then fails with "Address already in use" (seen in CI). Ports picked below the ephemeral range
and away from the RTP blocks (config `sip.rtp_port_start`, 20000+) are not handed out by the
kernel, so only another explicit picker could collide, and the random start makes that unlikely.
"""

from __future__ import annotations

import random
import socket

__all__ = ["free_sip_port", "PICK_RANGE"]

PICK_RANGE = (11000, 19999)


def _free(host: str, port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_sip_port(host: str = "127.0.0.1", span: int = 1) -> int:
    """A port free for UDP and TCP on `host` (and the `span - 1` ports after it)."""
    lo, hi = PICK_RANGE
    for _ in range(500):
        port = random.randint(lo, hi - span)
        if all(_free(host, port + k) for k in range(span)):
            return port
    raise OSError(f"no free port in {lo}..{hi} on {host}")
