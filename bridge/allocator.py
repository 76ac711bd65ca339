"""The C allocator under the service: keep large buffers out of its heaps, and give free pages back when idle.

Almost everything a session allocates is freed when it ends (the live-object counts return to
baseline; tests/test_memory.py), yet the process kept what its busiest moment needed: glibc
malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), so audio
buffers, decode results and codec frames soon come from the heaps instead of their own
mappings, and a heap only shrinks from its top. Pages freed in the middle stay resident, in
every per-thread arena (the event loop, the decode workers, the `to_thread` pool). The idle
process then held hundreds of MB it no longer used (docs/benchmarks.md, "Memory").

So, on glibc: a fixed mmap threshold (large blocks are mapped and unmapped again), and
`malloc_trim(0)` once the service has had no live call for `IDLE_TRIM_DELAY_S`, off the event
loop. Elsewhere both are no-ops. A trim gives back only what is already free: before it, the idle
service collects reference cycles (a finished WebRTC call is freed only by a full collection) and
reloads whisper contexts that kept a large decode's buffers (bridge/service.py, RecognizerPool.
release_scratch).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

__all__ = ["IDLE_TRIM_DELAY_S", "MMAP_THRESHOLD", "configure", "stats", "trim"]

IDLE_TRIM_DELAY_S = 2.0  # lets the last session's tails (closing sockets, final writes) free first
MMAP_THRESHOLD = 256 * 1024  # bytes; glibc's initial value is 128 KiB, its dynamic ceiling 32 MiB
_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "mallinfo2")):
        return None  # musl, macOS, old glibc
    libc.mallinfo2.restype = _MallInfo2
    return libc


_LIBC = _glibc()


def configure() -> bool:
    """Fix the mmap threshold (turning off glibc's dynamic raise). True when applied."""
    return _LIBC is not None and bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> bool:
    """Return free heap pages to the OS, in every arena. Takes each arena's lock in turn: run it
    in a thread, not on the event loop. True when something was released."""
    return _LIBC is not None and bool(_LIBC.malloc_trim(0))


def stats() -> dict[str, float]:
    """What malloc holds, in MB: heap (arenas), mmap (mapped blocks), in use, free in the heaps."""
    if _LIBC is None:
        return {}
    m = _LIBC.mallinfo2()
    mb = 1 / (1024 * 1024)
    return {"heap_mb": round(m.arena * mb, 1), "mmap_mb": round(m.hblkhd * mb, 1),
            "in_use_mb": round((m.uordblks + m.hblkhd) * mb, 1), "free_mb": round(m.fordblks * mb, 1)}
