"""The engine registry: a name in config (`model.engine`) -> the loader of that engine.

One entry per implementation module, as aiortc keys its codecs by name: adding an engine is its
module plus one line here (and its name in bridge/config.py's ENGINES, which cannot import this
package: numpy). The protocol every entry satisfies is `base.Engine`.
"""

from __future__ import annotations

from .base import SAMPLE_RATE, DecodeOptions, Engine, EngineLoader, Hypothesis, HypothesisFilter, ModelLoadError
from .whisper_cpp import WhisperEngine

__all__ = ["DEFAULT_ENGINE", "ENGINES", "SAMPLE_RATE", "DecodeOptions", "Engine", "EngineLoader", "Hypothesis",
           "HypothesisFilter", "ModelLoadError", "UnknownEngine", "load_engine"]

ENGINES: dict[str, EngineLoader] = {
    WhisperEngine.name: WhisperEngine.load,
}
DEFAULT_ENGINE = WhisperEngine.name


class UnknownEngine(ValueError):
    """A name no engine is registered under."""


def load_engine(name: str, model_path: str, *, threads: int = 1) -> Engine:
    """Load the engine registered as `name` for `model_path` (blocking: seconds)."""
    try:
        loader = ENGINES[name]
    except KeyError:
        raise UnknownEngine(f"no recognizer engine {name!r}; registered: {', '.join(sorted(ENGINES))}") from None
    return loader(model_path, threads=threads)
