"""What a leg's recognizer is to a call: the `LegRecognizer` protocol and its one factory.

A call (bridge/calls.py) gives each leg one of these: 16 kHz PCM16 goes in through `feed`,
`Partial` and `Final` events come out through the `emit` callback it was built with, in order,
and never a partial after its own final. Today's implementation re-decodes the open utterance
with a clip engine between VAD endpoints (`streamer.StreamingRecognizer`); a natively streaming
model would be a second entry in `LEG_RECOGNIZERS`, and callers would not change.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Protocol, Union, runtime_checkable

import numpy as np

from ..events.types import Final, Partial
from .pool import RecognizerPool
from .streamer import StreamerConfig, StreamingRecognizer

LegEvent = Union[Partial, Final]
Emit = Callable[[LegEvent], None]


@runtime_checkable
class LegRecognizer(Protocol):
    """One leg's streaming recognizer. Used from the event loop only."""

    channel: int
    speaker: str
    stats: dict[str, int]  # counters for logs and benches (finals, partials, ...)

    def start(self) -> asyncio.Task:
        """Start recognizing; the task ends after `finish` (or raises with the leg's failure)."""
        ...

    def feed(self, pcm: np.ndarray) -> None:
        """Take 1-D int16 16 kHz audio of any length; cheap, never blocks on a decode."""
        ...

    def force_endpoint(self) -> None:
        """End the open utterance now: its final follows."""
        ...

    def configure(self, endpointing_ms: int | None = None, **settings: Any) -> None:
        """Change settings while the leg runs (ValueError for a bad value)."""
        ...

    async def finish(self) -> None:
        """Flush: every final of the audio fed so far is emitted before this returns."""
        ...

    async def aclose(self) -> None:
        """Stop at once, without flushing (shutdown past its drain deadline)."""
        ...


class LegRecognizerFactory(Protocol):
    def __call__(self, pool: RecognizerPool, emit: Emit, *, channel: int, speaker: str,
                 config: StreamerConfig, logger: Any = None) -> LegRecognizer: ...


# name -> factory; "vad-redecode": VAD endpointing + re-decoding the utterance (streamer.py)
LEG_RECOGNIZERS: dict[str, LegRecognizerFactory] = {"vad-redecode": StreamingRecognizer}
DEFAULT_LEG_RECOGNIZER = "vad-redecode"


def new_leg_recognizer(pool: RecognizerPool, emit: Emit, *, channel: int, speaker: str,
                       config: StreamerConfig, logger: Any = None,
                       kind: str = DEFAULT_LEG_RECOGNIZER) -> LegRecognizer:
    """The one place a leg's recognizer is built."""
    return LEG_RECOGNIZERS[kind](pool, emit, channel=channel, speaker=speaker, config=config, logger=logger)
