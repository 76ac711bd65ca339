"""Wire encodings accepted at ingress and their conversion to/from int16 PCM.

G.711 goes through the stdlib ``audioop`` C code (``audioop-lts`` on Python >= 3.13): it is
fast, has no per-sample Python work, and its decode tables are bit-exact with sox, which the
tests check over all 256 codes.
"""

from __future__ import annotations

import warnings
from enum import Enum

import numpy as np

with warnings.catch_warnings():
    # 3.11/3.12 warn that audioop leaves the stdlib in 3.13; audioop-lts takes over there.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = [
    "Encoding",
    "InvalidAudioConfig",
    "InvalidAudio",
    "decode",
    "encode",
    "bytes_per_sample",
]

class InvalidAudioConfig(ValueError):
    """Stream parameters (encoding, rate, channels) we cannot accept; maps to INVALID_CONFIG."""


class InvalidAudio(ValueError):
    """A frame that cannot be decoded (partial samples, too large); maps to INVALID_AUDIO."""


class Encoding(str, Enum):
    PCM_S16LE = "pcm_s16le"
    PCM_MULAW = "pcm_mulaw"
    PCM_ALAW = "pcm_alaw"

    @classmethod
    def parse(cls, name: "str | Encoding") -> "Encoding":
        """Accept the canonical name (case-insensitive) or a common alias (SDP/Twilio spellings).

        Raises InvalidAudioConfig naming the valid values, so clients see what to send.
        """
        if isinstance(name, Encoding):
            return name
        if isinstance(name, str):
            key = name.strip().lower()
            for enc in cls:
                if enc.value == key:
                    return enc
            alias = _ALIASES.get(key)
            if alias is not None:
                return alias
        valid = ", ".join(e.value for e in cls)
        raise InvalidAudioConfig(
            f"unsupported audio encoding {name!r}; expected one of: {valid}"
        )


# Aliases only for unambiguous spellings. Notably NOT "l16": RTP L16 is big-endian.
_ALIASES: dict[str, Encoding] = {
    "s16le": Encoding.PCM_S16LE,
    "pcm16": Encoding.PCM_S16LE,
    "linear16": Encoding.PCM_S16LE,
    "mulaw": Encoding.PCM_MULAW,
    "ulaw": Encoding.PCM_MULAW,
    "pcmu": Encoding.PCM_MULAW,
    "g711_ulaw": Encoding.PCM_MULAW,
    "audio/x-mulaw": Encoding.PCM_MULAW,
    "alaw": Encoding.PCM_ALAW,
    "pcma": Encoding.PCM_ALAW,
    "g711_alaw": Encoding.PCM_ALAW,
    "audio/x-alaw": Encoding.PCM_ALAW,
}

_BYTES_PER_SAMPLE = {
    Encoding.PCM_S16LE: 2,
    Encoding.PCM_MULAW: 1,
    Encoding.PCM_ALAW: 1,
}


def bytes_per_sample(encoding: Encoding | str) -> int:
    """Bytes of one sample of one channel on the wire."""
    return _BYTES_PER_SAMPLE[Encoding.parse(encoding)]


def _native_i16(raw: bytes) -> np.ndarray:
    """audioop produces native-endian 16-bit; view it as int16 (copy so the result is writable)."""
    return np.frombuffer(raw, dtype=np.int16).copy()


def decode(encoding: Encoding | str, data: bytes | bytearray | memoryview) -> np.ndarray:
    """Wire bytes -> int16 samples (still interleaved if the stream is multichannel).

    Raises InvalidAudio when ``data`` is not a whole number of samples.
    """
    enc = Encoding.parse(encoding)
    bps = _BYTES_PER_SAMPLE[enc]
    n = len(data)
    if n % bps:
        raise InvalidAudio(
            f"{n} bytes is not a whole number of {enc.value} samples ({bps} bytes each)"
        )
    if enc is Encoding.PCM_S16LE:
        # astype to native int16 always copies, detaching us from the caller's buffer.
        return np.frombuffer(data, dtype="<i2").astype(np.int16)
    if enc is Encoding.PCM_MULAW:
        return _native_i16(audioop.ulaw2lin(bytes(data), 2))
    return _native_i16(audioop.alaw2lin(bytes(data), 2))


def encode(encoding: Encoding | str, pcm: np.ndarray) -> bytes:
    """int16 samples -> wire bytes (inverse of decode; used by tests and test clients).

    Note: audioop's G.711 encoder truncates toward the lower segment step, while sox rounds, so
    encoded bytes differ from sox at ~1% of quantisation boundaries; decoding is bit-exact.
    """
    enc = Encoding.parse(encoding)
    arr = np.asarray(pcm)
    if arr.dtype != np.int16:
        raise TypeError(f"encode expects int16 samples, got {arr.dtype}")
    if enc is Encoding.PCM_S16LE:
        return arr.astype("<i2", copy=False).tobytes()
    native = arr.astype(np.int16, copy=False).tobytes()
    if enc is Encoding.PCM_MULAW:
        return audioop.lin2ulaw(native, 2)
    return audioop.lin2alaw(native, 2)
