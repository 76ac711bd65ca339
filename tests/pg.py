"""A real PostgreSQL server for tests: Debian's PostgreSQL (15 on bookworm) (`initdb` + `pg_ctl`) in a temporary
directory, on a free loopback port, trust auth on 127.0.0.1 only, one fresh database per caller.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user (the
Debian package creates it) through `runuser`, with its data directory owned by that user. Absent
binaries are an error, not a skip: CI installs `postgresql` (APT_PACKAGES in ./run).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

__all__ = ["PG_BIN", "PgServer"]


def _pg_bin() -> Path:
    """CALLBRIDGE_TEST_PG_BIN, else the newest Debian server install (15 on bookworm)."""
    if os.environ.get("CALLBRIDGE_TEST_PG_BIN"):
        return Path(os.environ["CALLBRIDGE_TEST_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One server for a test session; `new_database()` gives each test an empty database."""

    def __init__(self) -> None:
        missing = [b for b in ("initdb", "pg_ctl") if not (PG_BIN / b).is_file()]
        if missing:
            raise RuntimeError(f"PostgreSQL server binaries not found in {PG_BIN} ({', '.join(missing)}): "
                               "install the Debian package `postgresql` (./run does) or set CALLBRIDGE_TEST_PG_BIN")
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="callbridge-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root, and there is no `postgres` user to run PostgreSQL as "
                                   "(the Debian package `postgresql` creates it)") from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self.started = False

    def _run(self, *argv: str) -> None:
        r = subprocess.run([*self._as, *argv], capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if r.returncode != 0:
            log = self.log.read_text() if self.log.is_file() else ""
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({r.returncode}): {r.stderr.strip()}\n{log}")

    def start(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        self.resume()

    def halt(self) -> None:
        """Stop the server as an outage would (fast shutdown: sessions cut), keeping its data."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.started = False

    def resume(self) -> None:
        """Start the server on its data directory and port; returns once it accepts connections."""
        # Loopback TCP only (no Unix socket); fsync off: a test server's durability is not under test.
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "start")
        self.started = True
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # pg_ctl returns once the postmaster runs; wait until it accepts connections
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL on port {self.port} did not accept connections in "
                                       f"{START_TIMEOUT_S:.0f} s: {e}\n{self.log.read_text()}") from e
                time.sleep(0.1)

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        name = "cb_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server this object started (pg_ctl finds it by its data directory) and remove it."""
        try:
            if self.started:
                self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
