"""Typed events that recognizers emit and every sink (sockets, webhooks, store) consumes.

Field names follow docs/stream-protocol.md; `to_dict()` gives the wire object (times rounded to
the millisecond). `event_fields()` gives the same keys unrounded, and `event_from_dict()` turns
either back into the typed event, so a node reading another node's events off a shared bus
(bridge/events/redisbus.py) holds the very events that node published.
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
    DTMF = "dtmf"


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


@dataclass(frozen=True)
class Usage:
    """Running totals of a session: audio seconds received and credits they cost (all channels)."""

    streamed_seconds: float
    credits_used: float
    type: EventType = field(default=EventType.USAGE, init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type.value, "streamed_seconds": round(self.streamed_seconds, 3),
                "credits_used": round(self.credits_used, 2)}


@dataclass(frozen=True)
class CallStarted:
    """A job went live: which ingress, and the speaker label of each channel."""

    source: str
    speakers: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. SIP identity: from, to, call_id, headers
    type: EventType = field(default=EventType.CALL_STARTED, init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type.value, "source": self.source, "speakers": list(self.speakers),
                "config": self.config, "metadata": self.metadata}


@dataclass(frozen=True)
class CallEnded:
    """A job ended: its final status, length, and the error that ended it, if any."""

    status: str
    streamed_seconds: float
    credits_used: float
    error: dict[str, Any] | None = None
    type: EventType = field(default=EventType.CALL_ENDED, init=False)

    def to_dict(self) -> dict[str, Any]:
        d = {"type": self.type.value, "status": self.status, "streamed_seconds": round(self.streamed_seconds, 3),
             "credits_used": round(self.credits_used, 2)}
        if self.error:
            d["error"] = self.error
        return d


@dataclass(frozen=True)
class Dtmf:
    """A telephone keypad digit (RFC 2833/4733) pressed on a leg, `at` seconds from call start."""

    digit: str
    channel: int
    speaker: str
    at: float
    duration_ms: int = 0
    type: EventType = field(default=EventType.DTMF, init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type.value, "digit": self.digit, "channel": self.channel, "speaker": self.speaker,
                "at": round(self.at, 3), "duration_ms": self.duration_ms}


Event = Partial | Final | Usage | CallStarted | CallEnded | Dtmf

EVENT_CLASSES: dict[EventType, type] = {EventType.PARTIAL: Partial, EventType.FINAL: Final, EventType.USAGE: Usage,
                                        EventType.CALL_STARTED: CallStarted, EventType.CALL_ENDED: CallEnded,
                                        EventType.DTMF: Dtmf}


def event_fields(ev: Any) -> dict[str, Any]:
    """The event's fields under its wire keys, unrounded: `event_from_dict` gives back an equal event."""
    d = asdict(ev)
    d["type"] = ev.type.value
    return d


def event_from_dict(d: dict[str, Any]) -> Any:
    """The typed event of a wire object (`to_dict()` or `event_fields()`); ValueError names what
    is wrong with one that is not an event."""
    if not isinstance(d, dict):
        raise ValueError(f"an event is a JSON object, got {type(d).__name__}")
    try:
        cls = EVENT_CLASSES[EventType(d.get("type"))]
    except ValueError:
        raise ValueError(f"unknown event type {d.get('type')!r}") from None
    kwargs = {k: v for k, v in d.items() if k != "type"}
    try:
        if cls is Final:
            kwargs["words"] = tuple(Word(**w) for w in kwargs.get("words", ()))
        elif cls is CallStarted:
            kwargs["speakers"] = tuple(kwargs.get("speakers", ()))
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad {cls.__name__} event: {e}") from None


def event_dict(ev: Any) -> dict[str, Any]:
    if hasattr(ev, "to_dict"):
        return ev.to_dict()
    return asdict(ev)
