"""Free space in the data directory: admission while it is low, and an emergency reserve for when it runs out.

Why a reserve file: on a full disk SQLite cannot even mark a job `failed` (its WAL append fails with
"database or disk is full"), so a crashed write would leave the job `live` for good. The guard keeps
a small file of zeros (`<data_dir>/space.reserve`) and deletes it the moment a write fails for lack
of space: the few writes that end the affected calls (job rows, WAV headers) then fit. While the disk
is exhausted no new audio is written, so the freed room is not eaten by recordings; the file is
recreated once free space is back above the reserve, the file and as much again.

`StorageGuard` is the one check every ingress uses before opening a call (streams, WebRTC offers,
SIP INVITEs) and what /healthz reports.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.logs import get_logger

__all__ = ["EMERGENCY_BYTES", "RESERVE_FILE", "DiskState", "StorageFull", "StorageGuard", "is_storage_full"]

log = get_logger("bridge.storage")

RESERVE_FILE = "space.reserve"
EMERGENCY_BYTES = 2 * 1024 * 1024  # room to end every live call once the disk is full (rows, headers)
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class StorageFull(Exception):
    """The data directory has (or had) too little free space to record; `code` is the wire code."""

    code = "STORAGE_FULL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def is_storage_full(exc: BaseException) -> bool:
    """True for the errors a full disk raises: ENOSPC/EDQUOT, SQLite's SQLITE_FULL, our StorageFull."""
    if isinstance(exc, StorageFull):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return False


@dataclass(frozen=True)
class DiskState:
    path: str
    free_bytes: int
    total_bytes: int
    reserve_bytes: int
    exhausted: bool  # a write failed for lack of space and free space has not come back yet

    @property
    def low(self) -> bool:
        return self.exhausted or self.free_bytes < self.reserve_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"status": "full" if self.exhausted else ("low" if self.low else "ok"),
                "free_bytes": self.free_bytes, "total_bytes": self.total_bytes,
                "min_free_bytes": self.reserve_bytes}


class StorageGuard:
    """Watches the free space of `data_dir` against `reserve_bytes`. Thread-safe (recorders write
    from worker threads)."""

    def __init__(self, data_dir: str | os.PathLike, reserve_bytes: int, emergency_bytes: int = EMERGENCY_BYTES) -> None:
        self.data_dir = Path(data_dir)
        self.reserve_bytes = int(reserve_bytes)
        self.emergency_bytes = int(emergency_bytes)
        self.reserve_path = self.data_dir / RESERVE_FILE
        self._lock = threading.Lock()  # the exhausted flag, with the free space it was judged by
        self._file_lock = threading.RLock()  # the reserve file (the event loop and /healthz's thread)
        self._exhausted = False
        self._has_reserve = False

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> DiskState:
        """Free space now. Once there is room again, clears `exhausted` and recreates the
        emergency reserve file (spent on a full disk, or at a start on one).

        After exhaustion "room again" means the reserve, the emergency file and as much again:
        the room the deleted file left must not count, or with no reserve configured the next
        look would find exactly that room, recreate the file and let live calls resume recording
        into the space it exists to keep. The look and the clearing happen under the flag's lock,
        so an `exhaust()` from a recorder thread in between is not lost."""
        with self._lock:
            st = os.statvfs(self.data_dir)
            free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
            if self._exhausted and free >= self.reserve_bytes + 2 * self.emergency_bytes:
                self._exhausted = False
                log.info("storage_recovered", free_bytes=free)
            if (not self._exhausted and not self._has_reserve
                    and free >= self.reserve_bytes + self.emergency_bytes and self.refill()):
                free = self._free()
            return DiskState(str(self.data_dir), free, total, self.reserve_bytes, self._exhausted)

    def caused(self, exc: BaseException) -> bool:
        """Whether the full disk explains `exc`: SQLite reports a -wal/-shm file it cannot create
        on a full disk as a plain "disk I/O error", so an I/O error with no room left counts. A
        store that could not open (bridge.stores.StoreUnavailable) is judged by the driver's error
        it wraps."""
        while exc.__cause__ is not None:
            exc = exc.__cause__
        if is_storage_full(exc):
            return True
        if isinstance(exc, (OSError, sqlite3.OperationalError)):
            try:
                return self._free() < self.emergency_bytes
            except OSError:
                return False
        return False

    @property
    def exhausted(self) -> bool:
        return self._exhausted

    def refusal(self) -> str | None:
        """Why a new session must be refused now, or None. The message is what clients see."""
        s = self.state()
        if not s.low:
            return None
        if s.exhausted:
            return (f"the server's disk is full ({_mb(s.free_bytes)} free); new sessions are refused until "
                    f"space is freed")
        return (f"the server's disk is nearly full ({_mb(s.free_bytes)} free, "
                f"{_mb(s.reserve_bytes)} kept in reserve); new sessions are refused until space is freed")

    # -- the emergency reserve -------------------------------------------------------------------
    def exhaust(self, exc: BaseException | None = None) -> None:
        """A write failed for lack of space: stop recording everywhere and free the reserve file."""
        with self._lock:
            first, self._exhausted = not self._exhausted, True
            freed = self.release()
        if first:
            log.error("storage_full", data_dir=str(self.data_dir), freed_reserve_bytes=freed,
                      error=repr(exc) if exc is not None else None)

    def release(self) -> int:
        """Delete the reserve file; returns the bytes it held."""
        with self._file_lock:
            self._has_reserve = False
            try:
                size = self.reserve_path.stat().st_size
                self.reserve_path.unlink()
            except FileNotFoundError:
                return 0
            return size

    def refill(self) -> bool:
        """(Re)create the reserve file when there is room for it beyond the reserve."""
        with self._file_lock:
            if self.emergency_bytes <= 0:
                self._has_reserve = True
                return True
            try:
                if self.reserve_path.stat().st_size >= self.emergency_bytes:
                    self._has_reserve = True
                    return True
            except FileNotFoundError:
                pass
            if self._free() < self.reserve_bytes + self.emergency_bytes:
                return False
            try:
                with open(self.reserve_path, "wb") as fh:
                    # real blocks, not a sparse file: fallocate where the filesystem has it
                    try:
                        os.posix_fallocate(fh.fileno(), 0, self.emergency_bytes)
                    except OSError as e:
                        if e.errno in _FULL_ERRNOS:
                            raise
                        fh.write(b"\0" * self.emergency_bytes)
            except OSError as e:
                self.release()
                log.warning("storage_reserve_not_created", error=repr(e))
                return False
            self._has_reserve = True
            return True

    def _free(self) -> int:
        st = os.statvfs(self.data_dir)
        return st.f_bavail * st.f_frsize


def _mb(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"
