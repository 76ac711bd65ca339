"""Interleaved <-> per-channel sample layout.

Each call leg is transcribed separately, so a stereo stream (one leg per channel) is split
into independent contiguous arrays that the resampler and recogniser can own.
"""

from __future__ import annotations

import numpy as np

from .codecs import InvalidAudio

__all__ = ["deinterleave", "interleave"]


def deinterleave(samples: np.ndarray, channels: int) -> list[np.ndarray]:
    """Split L R L R ... into ``channels`` contiguous int16 arrays (always fresh copies)."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    arr = np.asarray(samples, dtype=np.int16).reshape(-1)
    if arr.size % channels:
        raise InvalidAudio(
            f"{arr.size} samples is not a whole number of {channels}-channel sample frames"
        )
    if channels == 1:
        return [arr.copy()]
    frames = arr.reshape(-1, channels)
    return [np.ascontiguousarray(frames[:, c]) for c in range(channels)]


def interleave(chans: list[np.ndarray]) -> np.ndarray:
    """Inverse of deinterleave; all channels must have the same length."""
    if not chans:
        raise ValueError("interleave needs at least one channel")
    lengths = {len(c) for c in chans}
    if len(lengths) != 1:
        raise ValueError(f"channels differ in length: {[len(c) for c in chans]}")
    if len(chans) == 1:
        return np.asarray(chans[0], dtype=np.int16).copy()
    return np.stack([np.asarray(c, dtype=np.int16) for c in chans], axis=1).reshape(-1)
