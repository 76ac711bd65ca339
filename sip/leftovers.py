"""What a dead service leaves behind, and how the next one clears it away.

Workers die with the service (sip/worker.py: PR_SET_PDEATHSIG and a parent watch), but a worker
that cannot run its signal handler (stopped, or stuck in C code) can still outlive it, holding its
SIP and RTP ports: the next `serve` on those ports would then fail to start its workers. So the
service records its workers in a pid file in its data directory (`sip-workers.json`), and a new
service first ends the workers that file names, if their owner is dead.

A pid alone is not an identity (pids are reused), so every process is recorded as (pid, start time
in clock ticks since boot, from /proc/PID/stat), and a worker is only signalled when its command
line is still `-m sip.worker ... --control <the dead owner's socket>`: nothing else is ever killed.

The control socket lives in a `callbridge-sip-*` directory under the temp dir (Unix socket paths
max out at 108 bytes, too short for most data dirs). Each holds an `owner` file naming the service
process; directories whose owner is dead are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["OWNER_FILE", "PID_FILE", "SOCK_DIR_PREFIX", "ProcessId", "WorkerPidFile", "make_sock_dir", "remove_dead_sock_dirs",
           "stop_stale_workers", "wait_exited"]

PID_FILE = "sip-workers.json"
SOCK_DIR_PREFIX = "callbridge-sip-"
OWNER_FILE = "owner"
TERM_WAIT_S = 5.0  # a stale worker gets SIGTERM (its callers get a BYE), then SIGKILL after this
KILL_WAIT_S = 5.0
UNOWNED_AGE_S = 60.0  # a directory without an owner file is only judged once it is this old


@dataclass(frozen=True)
class ProcessId:
    """A process as (pid, start time): stays wrong for a reused pid."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        start = _start_time(pid)
        return None if start is None else cls(pid, start)

    @classmethod
    def me(cls) -> ProcessId:
        me = cls.of(os.getpid())
        assert me is not None
        return me

    def alive(self) -> bool:
        """Running (not a zombie) and still the same process."""
        return _start_time(self.pid) == self.start and not _zombie(self.pid)

    def cmdline(self) -> list[str]:
        try:
            raw = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return []
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a]

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start": self.start}

    @classmethod
    def from_json(cls, d: Any) -> ProcessId | None:
        if isinstance(d, dict) and isinstance(d.get("pid"), int) and isinstance(d.get("start"), int):
            return cls(d["pid"], d["start"])
        return None


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()  # after "pid (comm)": comm may hold spaces and ')'


def _start_time(pid: int) -> int | None:
    f = _stat_fields(pid)
    try:
        return int(f[19]) if f else None  # field 22 of stat; f[0] is field 3
    except (IndexError, ValueError):
        return None


def _zombie(pid: int) -> bool:
    f = _stat_fields(pid)
    return bool(f) and f[0] in ("Z", "X")


def is_worker_of(proc: ProcessId, control: str) -> bool:
    """`proc` is a `python -m sip.worker` serving the control socket `control`."""
    args = proc.cmdline()
    if "sip.worker" not in args or "--control" not in args:
        return False
    i = args.index("--control")
    return i + 1 < len(args) and args[i + 1] == control


class WorkerPidFile:
    """`<data dir>/sip-workers.json`: the owning service, its control socket and its workers."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / PID_FILE

    def read(self) -> tuple[ProcessId | None, str, list[ProcessId]]:
        """(owner, control socket path, workers); nothing usable gives (None, "", [])."""
        try:
            d = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None, "", []
        if not isinstance(d, dict):
            return None, "", []
        workers = [p for p in (ProcessId.from_json(w) for w in d.get("workers") or []) if p is not None]
        return ProcessId.from_json(d.get("owner")), str(d.get("control") or ""), workers

    def write(self, control: str, workers: list[ProcessId]) -> None:
        data = {"owner": ProcessId.me().to_json(), "control": control, "workers": [w.to_json() for w in workers]}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def wait_exited(proc: ProcessId, timeout: float) -> bool:
    """True once `proc` has exited (a zombie counts), False after `timeout` s."""
    deadline = time.monotonic() + timeout
    fd = -1
    with contextlib.suppress(OSError, AttributeError):
        fd = os.pidfd_open(proc.pid)  # readable once the process has exited: no polling
    try:
        while proc.alive():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if fd >= 0:
                loop = asyncio.get_running_loop()
                exited = loop.create_future()
                loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
                try:
                    await asyncio.wait_for(exited, left)
                except TimeoutError:
                    pass
                finally:
                    loop.remove_reader(fd)
            else:
                await asyncio.sleep(min(0.05, left))
        return True
    finally:
        if fd >= 0:
            os.close(fd)


async def stop_stale_workers(pid_file: WorkerPidFile, log: Any) -> list[int]:
    """End the workers a dead service in this data dir left running; returns their pids.
    A live owner (another service on this data dir) is left alone."""
    owner, control, workers = pid_file.read()
    if owner is None:
        return []
    if owner.alive():
        log.warning("sip_pid_file_owner_alive", pid=owner.pid, path=str(pid_file.path))
        return []
    stopped: list[int] = []
    for w in workers:
        if not w.alive() or not is_worker_of(w, control):
            continue
        log.warning("sip_stale_worker", pid=w.pid, control=control, owner_pid=owner.pid)
        for sig, wait in ((signal.SIGTERM, TERM_WAIT_S), (signal.SIGKILL, KILL_WAIT_S)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, sig)
                if sig == signal.SIGTERM:
                    os.kill(w.pid, signal.SIGCONT)  # a stopped worker handles its SIGTERM (BYEs) too
            if await wait_exited(w, wait):
                break
        else:
            log.error("sip_stale_worker_survived", pid=w.pid)
            continue
        stopped.append(w.pid)
    pid_file.remove()
    return stopped


def make_sock_dir() -> str:
    """A fresh `callbridge-sip-*` directory under the temp dir, its `owner` file naming us."""
    d = tempfile.mkdtemp(prefix=SOCK_DIR_PREFIX)
    Path(d, OWNER_FILE).write_text(json.dumps(ProcessId.me().to_json()))
    return d


def _sock_dir_dead(d: Path) -> bool:
    try:
        owner = ProcessId.from_json(json.loads((d / OWNER_FILE).read_text()))
    except (OSError, ValueError):
        owner = None
    if owner is not None:
        return not owner.alive()
    try:  # no owner file (an older version, or one being created): judge by the socket, once old
        if time.time() - d.stat().st_mtime < UNOWNED_AGE_S:
            return False
    except OSError:
        return False
    sock = d / "control.sock"
    if not sock.exists():
        return True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sock))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def remove_dead_sock_dirs(log: Any, tmp: str | None = None) -> list[str]:
    """Remove this user's `callbridge-sip-*` directories whose service is dead."""
    removed: list[str] = []
    root = Path(tmp or tempfile.gettempdir())
    try:
        entries = [p for p in root.iterdir() if p.name.startswith(SOCK_DIR_PREFIX)]
    except OSError:
        return removed
    uid = os.getuid()
    for d in entries:
        try:
            if not d.is_dir() or d.is_symlink() or d.stat().st_uid != uid:
                continue
        except OSError:
            continue
        if _sock_dir_dead(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    if removed:
        log.info("sip_stale_sock_dirs_removed", count=len(removed), dirs=removed[:10])
    return removed
