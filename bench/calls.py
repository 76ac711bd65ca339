"""Synthetic phone calls with known text and known speech timing, for the streaming benchmarks.

A call is a sequence of generated sentences separated by pauses. Each sentence's spoken span
(first to last audible sample) is recorded, so "end of speech" is ground truth rather than
the recognizer's own estimate.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

import numpy as np

from . import corpus, wordtimes

SR = 16000


@dataclass
class Call:
    name: str
    pcm: np.ndarray  # int16, 16 kHz
    text: str
    spans: list[tuple[float, float]]  # spoken (start, end) seconds of each sentence
    sentences: list[str]
    voice: str = "en-us"
    rate: int = 160
    offsets: list[float] = field(default_factory=list)  # where each sentence's synthesized audio starts (s)

    @property
    def seconds(self) -> float:
        return len(self.pcm) / SR

    @functools.cached_property
    def word_ends(self) -> list[tuple[str, float]]:
        """Every word of the script and when it really ends (s into the call). Computed on first
        use: it renders each sentence once more (bench/wordtimes.py), which only the latency
        benchmark needs."""
        return [(w, off + t) for text, off in zip(self.sentences, self.offsets)
                for w, t in word_ends(text, self.voice, self.rate)]


def speech_bounds(pcm: np.ndarray, thresh: int = 200) -> tuple[int, int]:
    idx = np.flatnonzero(np.abs(pcm.astype(np.int32)) > thresh)
    return (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, len(pcm))


def word_ends(text: str, voice: str, rate: int) -> list[tuple[str, float]]:
    """When each word of corpus.synthesize(text, voice, rate) ends, in seconds of that audio:
    the last audible sample before the next word starts (espeak-ng's own word starts), so the
    pause after a comma is not counted as part of the word before it."""
    pcm = corpus.synthesize(text, voice=voice, rate=rate)
    starts, _ = wordtimes.word_starts(text, voice, rate)
    out = []
    for k, (word, t0) in enumerate(starts):
        a = int(t0 * SR)
        b = int(starts[k + 1][1] * SR) if k + 1 < len(starts) else len(pcm)
        seg = pcm[a:b]
        audible = np.flatnonzero(np.abs(seg.astype(np.int32)) > 200)  # speech_bounds' threshold
        out.append((word, (a + (int(audible[-1]) + 1 if len(audible) else 0)) / SR))
    return out


def make_call(seconds: float, voice: str, rate: int, seed: int, pauses=(0.9, 1.6), lead: float = 0.5) -> Call:
    """Sentences in a seeded order until `seconds`, each followed by a pause drawn from `pauses`."""
    rng = random.Random(seed)
    order = list(corpus.SENTENCES)
    rng.shuffle(order)
    parts = [np.zeros(int(lead * SR), np.int16)]
    pos = len(parts[0])
    spans, used, offsets = [], [], []
    for text in order:
        s = corpus.synthesize(text, voice=voice, rate=rate)
        a, b = speech_bounds(s)
        s = s[a:b]
        spans.append(((pos) / SR, (pos + len(s)) / SR))
        offsets.append((pos - a) / SR)  # the trimmed sentence starts at pos
        used.append(text)
        pause = np.zeros(int(rng.uniform(*pauses) * SR), np.int16)
        parts += [s, pause]
        pos += len(s) + len(pause)
        if pos / SR >= seconds:
            break
    return Call(f"{voice}@{rate}#{seed}", np.concatenate(parts), " ".join(used), spans, used, voice, rate, offsets)


def standard_calls(n: int, seconds: float = 30.0, pauses=(0.9, 1.6)) -> list[Call]:
    """A deterministic mix of voices and speaking rates."""
    voices = [("en-us", 160), ("en", 170), ("en-us+f3", 150), ("en+m3", 165), ("en-us", 180), ("en", 150)]
    return [make_call(seconds, *voices[i % len(voices)], seed=100 + i, pauses=pauses) for i in range(n)]


def to_mulaw_roundtrip(pcm: np.ndarray) -> np.ndarray:
    """What a G.711 trunk delivers: 8 kHz mu-law, decoded and resampled back to 16 kHz."""
    from bridge.audio.frontend import AudioFormat, AudioFrontEnd

    mu = corpus.to_mulaw_8k(pcm)
    fe = AudioFrontEnd(AudioFormat("pcm_mulaw", 8000, 1))
    out = [fe.feed(mu[i : i + 160])[0] for i in range(0, len(mu), 160)]
    out += fe.flush()
    return np.concatenate(out)
