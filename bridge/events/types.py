"""Typed events that recognizers emit and every sink (sockets, webhooks, store) consumes.

Field names follow ../shared/spec/stream-protocol.md; `to_dict()` gives the wire object.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class EventType(str, Enum):
    PARTIAL = "partial"
    FINAL = "final"
    USAGE = "usage"
    CALL_STARTED = "call_started"
    CALL_ENDED = "call_ended"


@dataclass(frozen=True)
class Word:
    word: str
    start: float  # seconds from stream start
    end: float
    confidence: float  # 0..1, from whisper token probabilities

    def to_dict(self) -> dict[str, Any]:
        return {"word": self.word, "start": round(self.start, 3), "end": round(self.end, 3),
                "confidence": round(self.confidence, 4)}


@dataclass(frozen=True)
class Partial:
    """Interim text of the open utterance; superseded by the next partial or final."""

    text: str
    channel: int
    speaker: str
    start: float
    end: float
    type: EventType = field(default=EventType.PARTIAL, init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type.value, "text": self.text, "channel": self.channel, "speaker": self.speaker,
                "start": round(self.start, 3), "end": round(self.end, 3)}


@dataclass(frozen=True)
class Final:
    """A stabilized segment. `speech_final` is False for pieces of a long utterance cut at a cap."""

    text: str
    words: tuple[Word, ...]
    channel: int
    speaker: str
    start: float
    end: float
    speech_final: bool
    language: str | None = None
    confidence: float | None = None
    type: EventType = field(default=EventType.FINAL, init=False)

    def to_dict(self) -> dict[str, Any]:
        d = {"type": self.type.value, "text": self.text, "words": [w.to_dict() for w in self.words],
             "channel": self.channel, "speaker": self.speaker, "start": round(self.start, 3),
             "end": round(self.end, 3), "speech_final": self.speech_final}
        if self.language:
            d["language"] = self.language
        if self.confidence is not None:
            d["confidence"] = round(self.confidence, 4)
        return d


Event = Partial | Final


def event_dict(ev: Any) -> dict[str, Any]:
    if hasattr(ev, "to_dict"):
        return ev.to_dict()
    return asdict(ev)
