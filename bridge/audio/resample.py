"""Streaming sample-rate conversion to the recogniser's 16 kHz.

Why soxr in float32 rather than soxr's int16 mode: libsoxr dithers int16 output, so the same
audio chunked differently comes out different by up to 2 LSB. Running the filter in float32 and
rounding ourselves makes the output bit-identical to one-shot resampling of the whole stream
however the network happened to chunk it (tests check this from 1-sample chunks upward).
Why not audioop.ratecv: it has no real anti-alias filter (see bench/audio_frontend.py).
"""

from __future__ import annotations

import numpy as np
import soxr

__all__ = ["StreamResampler", "MIN_RATE", "MAX_RATE"]

MIN_RATE = 8000
MAX_RATE = 48000

_SCALE = 32768.0
_INV_SCALE = np.float32(1.0 / 32768.0)


def _to_int16(y: np.ndarray) -> np.ndarray:
    # HQ filters ring: a near-full-scale input can overshoot, so clip rather than wrap.
    return np.clip(np.rint(y * _SCALE), -32768, 32767).astype(np.int16)


class StreamResampler:
    """Stateful soxr stream (quality 'HQ'), any rate 8000-48000 -> ``out_rate`` (16 kHz).

    Output is identical to one-shot resampling of the concatenated input regardless of chunking.
    soxr compensates its filter's group delay: output sample k corresponds to input time
    k / out_rate exactly, so timestamps derived from output sample counts need no correction.
    What it does cost is latency: some input is held until enough look-ahead has arrived
    (``delay_s``); ``flush()`` releases it at end of stream.
    Equal rates are a passthrough with no filter and no latency.
    """

    def __init__(self, in_rate: int, out_rate: int = 16000, quality: str = "HQ"):
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self.quality = quality
        self._passthrough = self.in_rate == self.out_rate
        self._stream = (
            None
            if self._passthrough
            else soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32", quality=quality)
        )
        self._in_samples = 0
        self._out_samples = 0

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """Resample one chunk (int16 mono); returns whatever output is ready (may be empty)."""
        x = np.asarray(pcm)
        if x.dtype != np.int16:
            raise TypeError(f"StreamResampler expects int16 samples, got {x.dtype}")
        if x.ndim != 1:
            raise ValueError(f"StreamResampler expects mono 1-D samples, got shape {x.shape}")
        self._in_samples += x.size
        if self._passthrough:
            # Copy so the caller may reuse its buffer without aliasing what we returned.
            y = x.copy()
        else:
            y = _to_int16(self._stream.resample_chunk(np.ascontiguousarray(x, dtype=np.float32) * _INV_SCALE))
        self._out_samples += y.size
        return y

    def flush(self) -> np.ndarray:
        """Drain the samples still held for look-ahead; the stream then restarts fresh."""
        if self._passthrough:
            y = np.zeros(0, dtype=np.int16)
        else:
            y = _to_int16(self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
            self._stream.clear()  # soxr refuses input after last=True; make the object reusable
        self._in_samples = 0
        self._out_samples = 0
        return y

    @property
    def delay_s(self) -> float:
        """Seconds of received input not yet emitted (current latency; 0 for passthrough).

        This is the lag between the input and output timelines right now; it fluctuates with
        soxr's block processing (e.g. ~20-40 ms at 48 kHz, ~60-115 ms at 8 kHz with 20 ms frames).
        """
        return max(0.0, self._in_samples / self.in_rate - self._out_samples / self.out_rate)

    @property
    def passthrough(self) -> bool:
        return self._passthrough
