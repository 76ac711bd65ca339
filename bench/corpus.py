"""Generated speech with a known transcript, plus the noises a phone line adds.

Tests and benchmarks need speech whose words we know exactly, in many voices
and speeds, without shipping recordings or downloading corpora. espeak-ng is
robotic but deterministic and available from Debian, so a WER measured on it is
reproducible across machines. Everything here is deterministic: the same call
gives the same samples (for a given espeak-ng version), and synthesized audio
is cached on disk so repeated test runs do not pay for synthesis.

Conventions: audio is ``np.int16`` mono at 16 kHz unless a name says otherwise;
levels are RMS dBFS relative to int16 full scale (a full-scale square wave is
0 dBFS, a full-scale sine about -3 dBFS).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
import wave
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from .textnorm import normalize_numbers

with warnings.catch_warnings():
    # audioop is deprecated from 3.11 and removed in 3.13, where the
    # audioop-lts backport (a declared dependency) provides the same module.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = [
    "CACHE_DIR", "SENTENCES", "VOICES", "Utterance", "synthesize", "utterances",
    "monologue", "to_mulaw_8k", "to_alaw_8k", "silence", "noise", "NOISE_KINDS",
    "mix", "write_wav", "read_wav", "normalize_text", "word_errors", "wer", "rms_dbfs",
    "active_frames",
]

_REPO = Path(__file__).resolve().parents[1]

#: Where synthesized audio is cached. Read at call time, so tests may
#: monkeypatch it; the env var lets CI point it at a persistent cache.
CACHE_DIR: Path = Path(os.environ.get("CALLBRIDGE_CORPUS_DIR", _REPO / "tests" / ".generated"))

SAMPLE_RATE = 16000
_FULL_SCALE = 32768.0
# Bump when the synthesis pipeline changes so stale cache entries are ignored.
_CACHE_FORMAT = 1

#: Phone-call style sentences. Numbers are written as words so that a WER
#: does not depend on whether the recognizer prints "5" or "five".
SENTENCES: list[str] = [
    "Thank you for calling customer support, my name is Sarah, how can I help you today?",
    "I would like to check the status of my order, please.",
    "The order number is seven four two nine one eight.",
    "Could you please spell your last name for me?",
    "Sure, it is spelled M as in Mary, I, L, L, E, R.",
    "I live at twelve Maple Street, apartment four B, in Springfield.",
    "My card was charged twice for the same purchase last week.",
    "Let me transfer you to the billing department, one moment please.",
    "Your appointment is confirmed for Tuesday at half past three in the afternoon.",
    "I have been on hold for almost twenty minutes and nobody has answered.",
    "Can you confirm the email address we have on file for your account?",
    "The package was supposed to arrive yesterday but it never showed up.",
    "Please hold while I look up your account information.",
    "My phone number is five five five, two one three, eight eight four zero.",
    "I need to cancel my subscription before the next billing cycle.",
    "Is there anything else I can help you with today?",
    "The technician will arrive between nine and eleven tomorrow morning.",
    "I am calling about the refund you promised me last month.",
    "Your reference number for this call is alpha bravo six two seven.",
    "We are sorry for the inconvenience and we will send a replacement right away.",
    "Could you repeat that, the line is a little noisy on my end?",
    "The internet at my house keeps dropping every evening after seven.",
    "I want to update the shipping address to forty two Oak Avenue.",
    "Our office is open Monday through Friday from eight until six.",
    "Please say or enter your account number followed by the pound key.",
    "Hello, this is Daniel from the pharmacy returning your call.",
    "Your prescription is ready and you can pick it up after four.",
    "I was told someone would call me back but I never heard from anyone.",
    "The total comes to thirty nine dollars and ninety five cents including tax.",
    "Can I speak to a supervisor about this problem, please?",
    "We have your booking for two adults and one child for three nights.",
    "Good afternoon, I am calling to report a power outage on Elm Road.",
    "The warranty covers parts and labor for one full year from the date of purchase.",
    "Do you want me to send the confirmation by text message or by email?",
    "My flight was cancelled and I need to rebook for tomorrow morning.",
    "Thanks for your patience, I have fixed the problem on your account.",
]

#: espeak-ng voices (language + optional "+variant") present in Debian's
#: espeak-ng-data; mbrola voices are excluded because they need extra packages.
VOICES: list[str] = [
    "en-us",
    "en-us+f3",
    "en",
    "en+m3",
    "en-gb-x-rp",
    "en-gb-scotland+f2",
    "en-029",
    "en-us-nyc+m5",
]

NOISE_KINDS: tuple[str, ...] = ("white", "pink", "hum", "tone", "dtmf", "music", "babble")


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make == ambiguous
class Utterance:
    """One synthesized sentence with its reference text."""

    text: str
    voice: str
    rate: int  # words per minute (espeak-ng -s)
    pcm: np.ndarray  # int16 mono
    sample_rate: int = SAMPLE_RATE

    @property
    def seconds(self) -> float:
        return len(self.pcm) / self.sample_rate


# --------------------------------------------------------------------------- wav


def write_wav(path, pcm16: np.ndarray, rate: int = SAMPLE_RATE, channels: int = 1) -> None:
    """Write int16 PCM (interleaved if ``channels`` > 1, or shaped (n, channels))."""
    data = np.ascontiguousarray(pcm16, dtype=np.int16)
    if data.ndim == 2:
        channels = data.shape[1]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.astype("<i2", copy=False).tobytes())


def read_wav(path) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM wav; returns (int16 samples, interleaved if stereo; rate)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM wav is supported")
        rate = w.getframerate()
        raw = w.readframes(w.getnframes())
    return np.frombuffer(raw, dtype="<i2").astype(np.int16), rate


def _parse_stream_wav(blob: bytes) -> tuple[np.ndarray, int]:
    """Parse espeak-ng's --stdout wav, whose header sizes are placeholders (0x7fff...)."""
    if blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise RuntimeError("espeak-ng did not produce a wav stream")
    pos, rate = 12, None
    while pos + 8 <= len(blob):
        cid = blob[pos:pos + 4]
        size = int.from_bytes(blob[pos + 4:pos + 8], "little")
        if cid == b"fmt ":
            rate = int.from_bytes(blob[pos + 12:pos + 16], "little")
        elif cid == b"data":
            body = blob[pos + 8:]
            body = body[: len(body) // 2 * 2]
            if rate is None:
                raise RuntimeError("espeak-ng wav has no fmt chunk")
            return np.frombuffer(body, dtype="<i2").astype(np.int16), rate
        pos += 8 + size + (size & 1)
    raise RuntimeError("espeak-ng wav has no data chunk")


# --------------------------------------------------------------------------- tts


@functools.lru_cache(maxsize=1)
def _espeak_version() -> str:
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _resample(pcm16: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst:
        return np.asarray(pcm16, dtype=np.int16).copy()
    return soxr.resample(np.asarray(pcm16, dtype=np.int16), src, dst, quality="HQ")


def synthesize(text: str, voice: str = "en-us", rate: int = 160) -> np.ndarray:
    """Speak ``text`` with espeak-ng; int16 mono 16 kHz, cached on disk.

    The cache key includes the espeak-ng version so an upgrade cannot silently
    mix audio from two synthesizers. No padding is added: callers decide.
    """
    key = hashlib.sha256(
        json.dumps([text, voice, int(rate), _espeak_version(), _CACHE_FORMAT]).encode()
    ).hexdigest()[:32]
    cache = Path(CACHE_DIR) / "tts"
    path = cache / f"{key}.wav"
    if path.exists():
        try:
            return read_wav(path)[0]
        except (EOFError, wave.Error, ValueError):
            pass  # a truncated file from an interrupted run: regenerate
    proc = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(int(rate)), "--stdout", "--stdin"],
        input=text.encode("utf-8"),
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        raise RuntimeError(
            f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace').strip()}"
        )
    raw, src_rate = _parse_stream_wav(proc.stdout)
    pcm = _resample(raw, src_rate, SAMPLE_RATE)
    cache.mkdir(parents=True, exist_ok=True)
    # Atomic write: parallel test workers may synthesize the same sentence.
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
    os.close(fd)
    try:
        write_wav(tmp, pcm)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return pcm


def utterances(n: int | None = None, voices=None, rates=(140, 160, 180)) -> list[Utterance]:
    """``n`` utterances (default: one per sentence), round-robin over sentences,
    voices and rates so that any prefix is varied in all three."""
    voices = list(voices) if voices is not None else VOICES
    rates = list(rates)
    n = len(SENTENCES) if n is None else n
    out = []
    for i in range(n):
        text = SENTENCES[i % len(SENTENCES)]
        voice = voices[i % len(voices)]
        rate = rates[i % len(rates)]
        out.append(Utterance(text, voice, int(rate), synthesize(text, voice, rate)))
    return out


def monologue(seconds: float, pause_s: float = 0.3, voice: str = "en-us", rate: int = 170,
              seed: int = 0) -> tuple[np.ndarray, str]:
    """Sentences (shuffled by ``seed``) joined by ``pause_s`` of silence until the
    audio is at least ``seconds`` long; returns (pcm16 16 kHz, reference text)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(SENTENCES))
    parts, texts, total, i = [], [], 0, 0
    gap = silence(pause_s)
    while total < seconds * SAMPLE_RATE or not parts:
        if parts:
            parts.append(gap)
            total += len(gap)
        text = SENTENCES[order[i % len(order)]]
        pcm = synthesize(text, voice, rate)
        parts.append(pcm)
        texts.append(text)
        total += len(pcm)
        i += 1
    return np.concatenate(parts), " ".join(texts)


# --------------------------------------------------------------------------- g711


def to_mulaw_8k(pcm16_16k: np.ndarray) -> bytes:
    """16 kHz int16 -> 8 kHz G.711 mu-law bytes, as a US/JP phone line carries it."""
    pcm8 = _resample(pcm16_16k, SAMPLE_RATE, 8000)
    return audioop.lin2ulaw(pcm8.astype("<i2").tobytes(), 2)


def to_alaw_8k(pcm16_16k: np.ndarray) -> bytes:
    """16 kHz int16 -> 8 kHz G.711 A-law bytes (European lines)."""
    pcm8 = _resample(pcm16_16k, SAMPLE_RATE, 8000)
    return audioop.lin2alaw(pcm8.astype("<i2").tobytes(), 2)


# --------------------------------------------------------------------------- levels


def rms_dbfs(pcm: np.ndarray) -> float:
    """RMS level in dBFS (int16 full scale = 0 dB); -inf for digital silence."""
    x = np.asarray(pcm, dtype=np.float64)
    if x.size == 0:
        return float("-inf")
    p = float(np.mean(x * x))
    return 10 * np.log10(p / _FULL_SCALE**2) if p > 0 else float("-inf")


def _frame_power(pcm: np.ndarray, frame: int) -> np.ndarray:
    x = np.asarray(pcm, dtype=np.float64)
    n = len(x) // frame
    return np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1)


def active_frames(pcm: np.ndarray, rate: int = SAMPLE_RATE, frame_ms: float = 10.0,
                  rel_db: float = -35.0) -> np.ndarray:
    """Boolean mask of ``frame_ms`` frames whose energy is within ``rel_db`` of
    the loudest frame: the "where is the speech" label for clean synthetic audio,
    and the part of the speech that an SNR is measured over."""
    p = _frame_power(pcm, int(round(rate * frame_ms / 1000)))
    if p.size == 0 or p.max() <= 0:
        return np.zeros(p.shape, dtype=bool)
    return p > p.max() * 10 ** (rel_db / 10)


def _to_level(x: np.ndarray, level_dbfs: float) -> np.ndarray:
    """Scale float audio to an RMS level and return clipped int16."""
    rms = float(np.sqrt(np.mean(x * x))) if x.size else 0.0
    if rms == 0:
        return np.zeros(len(x), dtype=np.int16)
    y = x * (_FULL_SCALE * 10 ** (level_dbfs / 20) / rms)
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def silence(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    return np.zeros(int(round(seconds * rate)), dtype=np.int16)


# --------------------------------------------------------------------------- noises


def _ramp(x: np.ndarray, rate: int, ms: float = 5.0) -> np.ndarray:
    """Short fade in/out so tone bursts do not click (clicks are broadband)."""
    k = min(len(x) // 2, int(rate * ms / 1000))
    if k > 0:
        w = np.linspace(0.0, 1.0, k)
        x[:k] *= w
        x[-k:] *= w[::-1]
    return x


def _pink(n: int, rate: int, rng) -> np.ndarray:
    spec = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
    f = np.fft.rfftfreq(n, 1 / rate)
    # 1/f power; flat below 20 Hz so inaudible rumble does not dominate the RMS.
    spec /= np.sqrt(np.maximum(f, 20.0))
    spec[0] = 0
    return np.fft.irfft(spec, n)


def _hum(n: int, rate: int, rng, seed: int) -> np.ndarray:
    f0 = 60.0 if seed % 2 else 50.0  # mains: Americas vs. Europe
    t = np.arange(n) / rate
    x = np.zeros(n)
    for k in range(1, 20):
        if k * f0 >= rate / 2:
            break
        amp = (1.0 if k % 2 else 0.4) / k  # odd harmonics dominate transformer buzz
        x += amp * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
    return x


_DTMF = {
    "1": (697, 1209), "2": (697, 1336), "3": (697, 1477),
    "4": (770, 1209), "5": (770, 1336), "6": (770, 1477),
    "7": (852, 1209), "8": (852, 1336), "9": (852, 1477),
    "*": (941, 1209), "0": (941, 1336), "#": (941, 1477),
}


def _dtmf(n: int, rate: int, rng) -> np.ndarray:
    x = np.zeros(n)
    pos = int(rate * rng.uniform(0.05, 0.3))
    keys = list(_DTMF)
    while pos < n:
        lo, hi = _DTMF[keys[rng.integers(len(keys))]]
        on = int(rate * rng.uniform(0.08, 0.2))
        t = np.arange(min(on, n - pos)) / rate
        x[pos:pos + len(t)] = _ramp(np.sin(2 * np.pi * lo * t) + 0.8 * np.sin(2 * np.pi * hi * t), rate)
        pos += on + int(rate * rng.uniform(0.08, 0.4))
    return x


def _music(n: int, rate: int, rng) -> np.ndarray:
    """Hold music: pad chords, a pentatonic melody, bass, kick and hi-hat at 120 bpm."""
    beat, bar = 0.5, 2.0
    skip = int(rng.uniform(0, bar) * rate)  # random phase so seeds differ in timing too
    total = n + skip
    x = np.zeros(total)

    def put(start: float, wave_fn, dur: float) -> None:
        a, b = int(start * rate), min(total, int((start + dur) * rate))
        if b > a:
            x[a:b] += wave_fn(np.arange(b - a) / rate)

    def note(freq, harmonics, decay, gain):
        def f(tt):
            v = sum(np.sin(2 * np.pi * freq * k * tt) / k for k in range(1, harmonics + 1))
            return gain * _ramp(v * np.exp(-tt / decay) * np.minimum(1.0, tt / 0.01), rate)
        return f

    def kick(tt):  # pitch sweep 120 -> 45 Hz
        phase = 2 * np.pi * (45 * tt + 75 * 0.04 * (1 - np.exp(-tt / 0.04)))
        return 0.9 * np.sin(phase) * np.exp(-tt / 0.06)

    def hihat(tt):  # differentiated (bright) noise burst
        return 0.08 * np.diff(rng.standard_normal(len(tt) + 1)) * np.exp(-tt / 0.015)

    midi = lambda m: 440.0 * 2 ** ((m - 69) / 12)  # noqa: E731
    chords = [(60, 64, 67), (55, 59, 62), (57, 60, 64), (53, 57, 60)]  # C G Am F
    penta = [72, 74, 76, 79, 81, 84]
    for i in range(int(np.ceil(total / rate / bar))):
        t0, chord = i * bar, chords[i % 4]
        for m in chord:
            put(t0, note(midi(m), 6, 1.5, 0.25), bar)
        for b in range(4):
            s = t0 + b * beat
            put(s, note(midi(chord[0] - 12), 3, 0.3, 0.5), beat)  # bass
            put(s, kick, 0.2)
            put(s + beat / 2, hihat, 0.05)
            for h in range(2):
                if rng.random() < 0.8:
                    put(s + h * beat / 2, note(midi(penta[rng.integers(len(penta))]), 4, 0.25, 0.3), beat / 2)
    return x[skip:]


def _babble(n: int, rate: int, rng, talkers: int = 6) -> np.ndarray:
    """Background chatter: several espeak talkers, each a run of random
    sentences with a random start offset and distance (gain), summed."""
    x = np.zeros(n)
    speeds = (150, 170, 190)
    for k in range(talkers):
        voice, speed = VOICES[k % len(VOICES)], speeds[k % len(speeds)]
        offset = int(rng.uniform(0, 2.0) * rate)
        parts, total = [], 0
        for idx in rng.permutation(len(SENTENCES)).tolist() * (1 + n // (rate * 30)):
            if total >= n + offset:
                break
            pcm = synthesize(SENTENCES[idx], voice, speed).astype(np.float64)
            gap = np.zeros(int(rng.uniform(0.05, 0.3) * rate))
            parts += [pcm, gap]
            total += len(pcm) + len(gap)
        track = np.concatenate(parts)[offset:offset + n]
        track = track / (np.sqrt(np.mean(track**2)) + 1e-9)
        x[: len(track)] += rng.uniform(0.4, 1.0) * track
    return x


def noise(kind: str, seconds: float, rate: int = SAMPLE_RATE, level_dbfs: float = -30,
          seed: int = 0) -> np.ndarray:
    """A non-speech (or, for babble, not-the-caller) background at an RMS level.

    Kinds: white, pink, hum (50 Hz for even seeds, 60 Hz for odd, with
    harmonics), tone (1 kHz), dtmf (random digits), music (hold music with a
    beat), babble (overlapping espeak talkers). The level is the RMS over the
    whole clip, gaps included (relevant for dtmf).
    """
    n = int(round(seconds * rate))
    rng = np.random.default_rng([seed, NOISE_KINDS.index(kind) if kind in NOISE_KINDS else 99])
    if n == 0:
        return np.zeros(0, dtype=np.int16)
    if kind == "white":
        x = rng.standard_normal(n)
    elif kind == "pink":
        x = _pink(n, rate, rng)
    elif kind == "hum":
        x = _hum(n, rate, rng, seed)
    elif kind == "tone":
        x = np.sin(2 * np.pi * 1000.0 * np.arange(n) / rate)
    elif kind == "dtmf":
        x = _dtmf(n, rate, rng)
    elif kind == "music":
        x = _music(n, rate, rng)
    elif kind == "babble":
        x = _babble(int(round(seconds * SAMPLE_RATE)), SAMPLE_RATE, rng)
        if rate != SAMPLE_RATE:
            x = np.resize(soxr.resample(x, SAMPLE_RATE, rate, quality="HQ"), n)
    else:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")
    return _to_level(x, level_dbfs)


def mix(speech: np.ndarray, background: np.ndarray, snr_db: float) -> np.ndarray:
    """Add ``background`` (looped or trimmed to the speech length) at ``snr_db``.

    The speech power is measured over its active 10 ms frames only, so leading
    and trailing silence (or pauses) do not make the SNR look worse than a
    listener would hear it. The result is clipped to int16.
    """
    s = np.asarray(speech, dtype=np.float64)
    if len(s) == 0:
        return np.zeros(0, dtype=np.int16)
    b = np.resize(np.asarray(background, dtype=np.float64), len(s))  # resize tiles
    pb = float(np.mean(b * b)) if len(background) else 0.0
    if pb == 0:
        return np.asarray(speech, dtype=np.int16).copy()
    mask = active_frames(speech)
    power = _frame_power(speech, 160)
    if not mask.any():
        raise ValueError("speech is silent; SNR is undefined")
    ps = float(np.mean(power[mask]))
    gain = np.sqrt(ps / (pb * 10 ** (snr_db / 10)))
    return np.clip(np.round(s + gain * b), -32768, 32767).astype(np.int16)


# --------------------------------------------------------------------------- wer

_APOS = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})


def normalize_text(s: str) -> str:
    """Lowercase, drop punctuation (keeping in-word apostrophes: "don't"),
    split hyphenated words, collapse whitespace. Only what a fair WER needs."""
    s = s.translate(_APOS).lower()
    s = re.sub(r"[-\u2010-\u2015/_]", " ", s)
    s = re.sub(r"[^\w\s']", " ", s)
    s = re.sub(r"(?<!\w)'+|'+(?!\w)", " ", s)
    return " ".join(normalize_numbers(s.split()))


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edit distance, reference words) after normalize_text; sum them for a corpus WER."""
    ref = normalize_text(reference).split()
    hyp = normalize_text(hypothesis).split()
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1], len(ref)


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: (substitutions + deletions + insertions) / reference words.

    An empty reference counts every hypothesis word as an error (denominator 1),
    so hallucinated text on silence is visible instead of a division by zero.
    """
    errors, n_ref = word_errors(reference, hypothesis)
    return errors / n_ref if n_ref else float(errors)
