"""What a speech recognition engine is to the rest of callbridge: the `Engine` protocol.

The pool and the leg recognizers see only this: decode a clip of 16 kHz mono audio with
engine-neutral options into a `Hypothesis` (text, timed words with confidences, language), say
which languages it knows and whether the loaded model speaks more than English, and hand out the
engine's own test for a hypothesis that is not speech (`HypothesisFilter`). What only one engine
has (whisper.cpp's encoder context margins, its failure signals, its stock phrases) stays in that
engine's module, behind these types. docs/recognizer.md ("Engines") says how to add one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ...events.types import Word

SAMPLE_RATE = 16000  # what every leg feeds (the audio front-end resamples to it)


class ModelLoadError(RuntimeError):
    """The engine could not load its model (missing, corrupt, or not its format)."""


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode one clip. An engine may take a subclass with its own extra knobs."""

    language: str = "en"  # a code from `Engine.languages`, or "auto" (multilingual models)
    prompt: str = ""  # word_boost terms and/or preceding text
    partial: bool = False  # partials trade accuracy for speed; finals take the accurate path
    offline: bool = False  # the engine's best offline pass over any length (the accuracy baseline)


@dataclass
class Hypothesis:
    """What one decode said. Engines return a subclass carrying their own signals (what their
    `HypothesisFilter` reads); `signals()` lists them for logs."""

    text: str
    words: list[Word]  # times in seconds relative to the start of the decoded audio
    language: str | None  # the language decoded in (detected for "auto")
    audio_s: float
    decode_s: float
    retried: bool = False  # the engine redid the decode because its first try failed its own checks

    def signals(self) -> dict[str, float]:
        return {}


@runtime_checkable
class HypothesisFilter(Protocol):
    """An engine's test for text it invents on noise (whisper: subtitle phrases, loops)."""

    def rejects(self, hyp: Hypothesis, speech_s: float) -> bool:
        """True when `hyp` is not to be trusted; `speech_s`: voice activity the leg heard in the clip."""
        ...


@runtime_checkable
class Engine(Protocol):
    """One loaded model. Not thread-safe: the pool gives each instance to one thread at a time,
    and runs `decode` off the event loop (it blocks for the length of the decode)."""

    name: str  # its registry name (bridge/recognizer/engines/__init__.py)
    sample_rate: int  # what `decode` takes; the pool refuses an engine that differs from SAMPLE_RATE
    multilingual: bool  # the loaded model transcribes more than English (and detects with "auto")
    languages: frozenset[str]  # the language codes a request may name (not "auto")
    hypothesis_filter: HypothesisFilter

    def decode(self, audio: np.ndarray, opts: DecodeOptions) -> Hypothesis:
        """Decode mono audio (float32 in [-1, 1] or int16) at `sample_rate`."""
        ...

    def holds_scratch(self) -> bool:
        """Past decodes left memory resident that a fresh load of the model would not hold: the
        pool reloads such an engine when the service is idle (RecognizerPool.release_scratch)."""
        ...


class EngineLoader(Protocol):
    """A registry entry: load an engine for a model file, decoding with `threads` CPU threads."""

    def __call__(self, model_path: str, *, threads: int) -> Engine: ...
