"""Single entry point turning any ingress audio into 16 kHz int16 mono per channel.

WebSocket clients, SIP legs (8 kHz G.711) and WebRTC (48 kHz) all end here, so validation
lives here too: a bad frame is rejected before any state changes, and the stream carries on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .channels import deinterleave
from .codecs import Encoding, InvalidAudio, InvalidAudioConfig, bytes_per_sample, decode
from .resample import MAX_RATE, MIN_RATE, StreamResampler

__all__ = ["AudioFormat", "AudioFrontEnd", "MAX_FRAME_BYTES", "MAX_CHANNELS"]

MAX_FRAME_BYTES = 1 << 20
MAX_CHANNELS = 2


@dataclass(frozen=True)
class AudioFormat:
    """What the client says it sends. Strings are accepted for ``encoding`` (see Encoding.parse)."""

    encoding: Encoding = Encoding.PCM_S16LE
    sample_rate: int = 16000
    channels: int = 1

    def __post_init__(self) -> None:
        # Normalise a valid string now; an invalid one is left for validate() to report.
        if not isinstance(self.encoding, Encoding):
            try:
                object.__setattr__(self, "encoding", Encoding.parse(self.encoding))
            except InvalidAudioConfig:
                pass

    def validate(self) -> "AudioFormat":
        """Raise InvalidAudioConfig on anything we cannot process; returns self for chaining."""
        Encoding.parse(self.encoding)
        rate = self.sample_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
            raise InvalidAudioConfig(f"sample_rate must be an integer in Hz, got {rate!r}")
        if not MIN_RATE <= rate <= MAX_RATE:
            raise InvalidAudioConfig(
                f"sample_rate {rate} Hz out of range; expected {MIN_RATE}..{MAX_RATE} Hz"
            )
        ch = self.channels
        if isinstance(ch, bool) or not isinstance(ch, (int, np.integer)) or not 1 <= ch <= MAX_CHANNELS:
            raise InvalidAudioConfig(f"channels must be 1 or {MAX_CHANNELS}, got {ch!r}")
        return self

    @property
    def frame_bytes(self) -> int:
        """Bytes in one sample frame (one sample for every channel)."""
        return bytes_per_sample(self.encoding) * self.channels


class AudioFrontEnd:
    """Decode -> de-interleave -> resample, per channel, stateful across frames."""

    def __init__(self, fmt: AudioFormat, out_rate: int = 16000):
        self.fmt = fmt.validate()
        self.encoding = Encoding.parse(fmt.encoding)
        self.out_rate = out_rate
        self.channels = int(fmt.channels)
        self._frame_bytes = bytes_per_sample(self.encoding) * self.channels
        self._resamplers = [StreamResampler(fmt.sample_rate, out_rate) for _ in range(self.channels)]
        self._in_frames = 0

    def _check(self, frame: bytes) -> int:
        n = len(frame)
        if n > MAX_FRAME_BYTES:
            raise InvalidAudio(f"audio frame of {n} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
        if n % self._frame_bytes:
            layout = "mono" if self.channels == 1 else f"{self.channels}-channel interleaved"
            raise InvalidAudio(
                f"audio frame of {n} bytes is not a whole number of samples: {layout} "
                f"{self.encoding.value} needs a multiple of {self._frame_bytes} bytes"
            )
        return n

    def feed(self, frame: bytes | bytearray | memoryview) -> list[np.ndarray]:
        """One frame in; one int16 ``out_rate`` array per channel out (possibly empty).

        Raises InvalidAudio before touching any state, so later good frames are unaffected.
        """
        if isinstance(frame, memoryview) and frame.itemsize != 1:
            frame = frame.cast("B")  # len() must count bytes, not items
        n = self._check(frame)
        if n == 0:
            return [np.zeros(0, dtype=np.int16) for _ in range(self.channels)]
        chans = deinterleave(decode(self.encoding, frame), self.channels)
        self._in_frames += n // self._frame_bytes
        return [rs.process(c) for rs, c in zip(self._resamplers, chans)]

    def flush(self) -> list[np.ndarray]:
        """End of stream: drain each channel's resampler."""
        return [rs.flush() for rs in self._resamplers]

    @property
    def input_seconds(self) -> float:
        """Audio seconds received per channel so far (basis for usage/credits)."""
        return self._in_frames / self.fmt.sample_rate

    @property
    def delay_s(self) -> float:
        """Latency currently held by the resamplers (max over channels)."""
        return max(rs.delay_s for rs in self._resamplers)
