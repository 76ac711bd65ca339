"""Crash-tolerant call recording: one WAV channel per leg, written as audio arrives.

Why hand-rolled rather than ``wave.Wave_write``: the stdlib writer only fixes the header sizes
on close, so a killed process leaves a file that claims zero (or wrong) length. Here the data is
appended first and the header rewritten after it on every flush(), so at any instant the header
describes a prefix of what is already in the file: readable by ``wave`` even mid-call or after a
crash, the header behind the data by at most what arrived since the last flush.

Writes are unbuffered (one ``write`` syscall per batch) so the count of frames written is exactly
what the file holds: a write cut short by a full disk keeps its whole frames, the torn one is
truncated away and the header rewritten to match. A buffered writer could leave bytes in the file
that the count (and so the header) never included: a recording that said 622.6 s held 649 s.
After a crash, ``repair_wav`` sets the header from the file's size (the data can only be ahead).
"""

from __future__ import annotations

import errno
import io
import os
import struct
import threading
import wave
from pathlib import Path

import numpy as np

from .channels import interleave

__all__ = ["WavRecorder", "read_wav", "repair_wav"]

_HEADER_BYTES = 44
_MAX_DATA_BYTES = 0xFFFFFFFF - 36  # RIFF sizes are 32-bit


def _header(channels: int, rate: int, data_bytes: int) -> bytes:
    block_align = channels * 2
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block_align, block_align, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


class WavRecorder:
    """Multi-channel 16-bit WAV written incrementally (one channel per call leg).

    Legs deliver audio independently (jitter, DTX, hold, big batches). Each channel is queued
    and only whole time-aligned sample frames are written. Silence padding is decided at
    flush(), not in write(): a leg more than ``max_skew_s`` behind the longest is taken to have
    stopped sending and is padded up to the leader. Deciding in write() would wrongly pad leg 1
    whenever leg 0 of the same multi-second frame is written first. close() pads every leg to the
    longest; pad_to() aligns exactly to a wall-clock time the caller knows. Call flush() on a
    timer (e.g. every second): that bounds both crash loss and how long a silent leg stalls output;
    a leg that resumes after silence lands at most ``max_skew_s`` + one flush interval early.

    ``autoflush_s`` rewrites the header (no padding) after that much newly written audio, so
    loss stays bounded even without flush() calls; None disables it. ``max_pending_s`` caps the
    memory a silent leg can make the others queue (padding is forced beyond it). ``fsync``
    also survives a machine crash (costs a disk sync per flush).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        channels: int,
        sample_rate: int = 16000,
        *,
        max_skew_s: float = 0.5,
        autoflush_s: float | None = 1.0,
        max_pending_s: float = 120.0,
        fsync: bool = False,
    ):
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.path = Path(path)
        self.channels = int(channels)
        self.sample_rate = int(sample_rate)
        self._max_skew = max(0, int(round(max_skew_s * sample_rate)))
        self._max_pending = max(self._max_skew, int(max_pending_s * sample_rate))
        self._autoflush = None if autoflush_s is None else max(1, int(autoflush_s * sample_rate))
        self._fsync = fsync
        self._pending: list[np.ndarray] = [np.zeros(0, dtype=np.int16) for _ in range(channels)]
        self._frames_written = 0
        self._frames_at_flush = 0
        self._lock = threading.Lock()
        self._closed = False
        self._block = self.channels * 2
        self._fh = open(self.path, "wb", buffering=0)
        try:
            _write_all(self._fh, _header(self.channels, self.sample_rate, 0))  # a valid, empty WAV from the start
        except BaseException:
            self._fh.close()  # no 0-byte or torn-header files left behind (a full disk)
            self.path.unlink(missing_ok=True)
            raise

    # -- public API ---------------------------------------------------------------------------

    def write(self, channel: int, pcm: np.ndarray) -> None:
        """Queue int16 mono samples for ``channel`` and write whatever is now time-aligned."""
        self.write_frames({channel: pcm})

    def write_frames(self, chans: "list[np.ndarray] | dict[int, np.ndarray]") -> None:
        """Queue audio for several legs at once (e.g. one AudioFrontEnd.feed() result)."""
        items = chans.items() if isinstance(chans, dict) else enumerate(chans)
        checked = []
        for channel, pcm in items:
            if not 0 <= channel < self.channels:
                raise ValueError(f"channel {channel} out of range for a {self.channels}-channel recording")
            arr = np.asarray(pcm)
            if arr.dtype != np.int16:
                raise TypeError(f"WavRecorder expects int16 samples, got {arr.dtype}")
            checked.append((channel, arr.reshape(-1)))
        with self._lock:
            self._ensure_open()
            for channel, arr in checked:
                if arr.size:
                    self._pending[channel] = np.concatenate([self._pending[channel], arr])
            if max(p.size for p in self._pending) > self._max_pending:
                self._pad_to(max(p.size for p in self._pending))
            self._drain()
            if self._autoflush is not None and self._frames_written - self._frames_at_flush >= self._autoflush:
                self._flush_locked()

    def flush(self) -> None:
        """Pad legs lagging > max_skew_s, then make everything aligned durable and in the header.

        A no-op once closed or abandoned (close already did this; abandon keeps what the disk took):
        a timer's flush in a worker thread can lose the race with an abandon on the event loop, and
        checking "still open?" first cannot close that window, only this lock can."""
        with self._lock:
            if self._closed:
                return
            lead = max(p.size for p in self._pending)
            if lead - min(p.size for p in self._pending) > self._max_skew:
                self._pad_to(lead)
                self._drain()
            self._flush_locked()

    def close(self) -> None:
        """Pad every leg to the longest, finalise the header and close. Idempotent; the file is
        closed (with a header matching its data) even when the last write fails."""
        with self._lock:
            if self._closed:
                return
            try:
                self._pad_to(max(p.size for p in self._pending))
                self._drain()
                self._flush_locked()
            finally:
                self._fh.close()
                self._closed = True

    def abandon(self) -> None:
        """Close without writing what is still queued (the disk is full): the file keeps what it
        holds, its header matching. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._pending = [p[:0] for p in self._pending]
            try:
                self._write_header()
            except OSError:
                pass  # the header is at most one flush behind; repair_wav fixes it on recovery
            finally:
                self._fh.close()
                self._closed = True

    def pad_to(self, seconds: float) -> None:
        """Pad every leg holding less than ``seconds`` of audio with silence up to it.

        For a wall-clock tick: a leg on hold / DTX sends nothing, and only the caller knows
        how much real time has passed.
        """
        with self._lock:
            self._ensure_open()
            pending_target = int(round(seconds * self.sample_rate)) - self._frames_written
            if pending_target > 0:
                self._pad_to(pending_target)
                self._drain()

    @property
    def frames_written(self) -> int:
        """Sample frames (per channel) written to the file so far."""
        return self._frames_written

    @property
    def seconds(self) -> float:
        return self._frames_written / self.sample_rate

    def __enter__(self) -> "WavRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed:
            raise ValueError(f"WavRecorder for {self.path} is closed")

    def _pad_to(self, n: int) -> None:
        for c, p in enumerate(self._pending):
            if p.size < n:
                self._pending[c] = np.concatenate([p, np.zeros(n - p.size, dtype=np.int16)])

    def _drain(self) -> None:
        n = min(p.size for p in self._pending)
        if n == 0:
            return
        if (self._frames_written + n) * self.channels * 2 > _MAX_DATA_BYTES:
            raise ValueError(f"recording {self.path} would exceed the 4 GiB WAV size limit")
        block = interleave([p[:n] for p in self._pending])
        self._pending = [p[n:].copy() for p in self._pending]
        data = block.astype("<i2", copy=False).tobytes()
        try:
            _write_all(self._fh, data)
        except OSError as e:
            # Keep the whole frames that reached the file, drop a torn one, make the header say so.
            done = getattr(e, "bytes_written", 0) // self._block
            self._frames_written += done
            end = _HEADER_BYTES + self._frames_written * self._block
            try:
                os.ftruncate(self._fh.fileno(), end)
                self._fh.seek(end)
                self._write_header()
            except OSError:
                pass  # repair_wav fixes the header on recovery
            raise
        self._frames_written += n

    def _write_header(self) -> None:
        data_bytes = self._frames_written * self._block
        os.pwrite(self._fh.fileno(), _header(self.channels, self.sample_rate, data_bytes), 0)
        self._frames_at_flush = self._frames_written

    def _flush_locked(self) -> None:
        # Data first (already in the file: writes are unbuffered), header second: the header must
        # never claim bytes not yet in the file.
        self._write_header()
        if self._fsync:
            os.fsync(self._fh.fileno())


def _write_all(fh: io.RawIOBase, data: bytes) -> None:
    """Write every byte (a raw write may be partial). On failure the OSError carries
    `bytes_written`, what reached the file before it."""
    view, done = memoryview(data), 0
    while done < len(view):
        try:
            n = fh.write(view[done:])
        except OSError as e:
            e.bytes_written = done  # type: ignore[attr-defined]
            raise
        if not n:
            err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            err.bytes_written = done  # type: ignore[attr-defined]
            raise err
        done += n


def repair_wav(path: str | os.PathLike) -> float | None:
    """After a crash: set the header of a recording written by WavRecorder to the whole frames the
    file holds (the header lags the data by up to one flush, never leads it) and return its length
    in seconds. A torn last frame is cut off. None when there is no readable recording: a file too
    short to hold a header (nothing was recorded) is removed."""
    p = Path(path)
    try:
        fh = open(p, "r+b", buffering=0)
    except FileNotFoundError:
        return None
    with fh:
        head = fh.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES or head[:4] != b"RIFF" or head[8:16] != b"WAVEfmt ":
            if len(head) < _HEADER_BYTES:
                fh.close()
                p.unlink(missing_ok=True)
            return None
        channels, rate = struct.unpack("<HI", head[22:28])
        block = channels * 2
        if not block or not rate:
            return None
        size = os.fstat(fh.fileno()).st_size
        frames = min(size - _HEADER_BYTES, _MAX_DATA_BYTES) // block
        end = _HEADER_BYTES + frames * block
        if size != end:
            os.ftruncate(fh.fileno(), end)
        if struct.unpack("<I", head[40:44])[0] != frames * block:
            os.pwrite(fh.fileno(), _header(channels, rate, frames * block), 0)
    return frames / rate


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int, int]:
    """Read a 16-bit PCM WAV -> (int16 interleaved samples, sample_rate, channels)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * w.getsampwidth()}-bit")
        rate, channels = w.getframerate(), w.getnchannels()
        frames = w.readframes(w.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.int16), rate, channels
