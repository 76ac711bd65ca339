"""A real Redis server for tests: Debian's `redis-server` on a free loopback port, no persistence
(`--save ''`, `--appendonly no`), in a temporary directory; stopped by its PID. Named redisd, never
redis: a module `redis` would shadow the client package.

`stop()` and `start()` may be called again on one object: the server comes back on the same port
(tests/test_event_bus_faults.py takes Redis away under a live call and brings it back). An absent
binary is an error, not a skip: CI installs `redis-server` (APT_PACKAGES in ./run).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["REDIS_SERVER", "RedisServer", "free_port"]

REDIS_SERVER = os.environ.get("CALLBRIDGE_TEST_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        if not Path(REDIS_SERVER).is_file():
            raise RuntimeError(f"redis-server not found ({REDIS_SERVER}): install the Debian package `redis-server` "
                               "(./run does) or set CALLBRIDGE_TEST_REDIS_SERVER")
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="callbridge-redis-"))
        self.log = self.root / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError("already running")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root), "--logfile", str(self.log), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log.read_text() if self.log.is_file() else ""
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM the server this object started (by PID) and wait for it to exit."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
