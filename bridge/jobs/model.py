"""Typed records for jobs (one per stream/call) and their final segments."""

from __future__ import annotations

import os
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

MAX_LABEL_CHARS = 100  # speaker labels end up in subtitle cues and every event: keep them label-sized
MAX_TEXT_CHARS = 10000  # an edited segment's text; recognized ones are one utterance (<= 15 s)

# Characters that end a line or steer rendering: control characters (C0, C1, DEL; newline and tab
# too), unpaired surrogates, line/paragraph separators, and the bidi embeddings, overrides and
# isolates that make a label display as something else. A subtitle or text export with one of
# these in a label or a line can be made to show cues that were never spoken.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_BIDI_CONTROLS = frozenset(map(chr, (*range(0x202A, 0x202F), *range(0x2066, 0x206A))))

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ulid_lock = threading.Lock()
_last_ms = -1
_last_rand = 0


class JobStatus(str, Enum):
    LIVE = "live"
    COMPLETED = "completed"
    FAILED = "failed"


class JobSource(str, Enum):
    """Where a job came in: the one list of sources. Each has its ingress (bridge/ingress/registry.py);
    the jobs filter, the webhooks' `sources`, the CLI and the OpenAPI schema take their choices from here."""

    STREAM = "stream"
    SIP = "sip"
    WEBRTC = "webrtc"


@dataclass
class Job:
    """A transcription session. `owner` is the API key id so each key only sees its own jobs."""

    id: str
    owner: str
    status: JobStatus = JobStatus.LIVE
    source: JobSource = JobSource.STREAM
    created_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    duration_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    speakers: list[str] = field(default_factory=list)  # label per channel
    metadata: dict[str, Any] = field(default_factory=dict)
    audio_path: str | None = None
    error: dict[str, Any] | None = None  # {"code", "message"} when failed
    # the node that ran it (docs/cluster.md): whose restart or death fails it while live. Not in
    # to_dict: an internal routing fact, not part of the job an API client sees.
    node_id: str = ""

    def __post_init__(self) -> None:
        self.status = JobStatus(self.status)
        self.source = JobSource(self.source)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status.value, "source": self.source.value,
                "created_at": self.created_at, "ended_at": self.ended_at, "duration_s": self.duration_s,
                "config": self.config, "speakers": self.speakers, "metadata": self.metadata,
                "error": self.error}


@dataclass
class Segment:
    """One stored `final` event; original_* keep what the recognizer said before a human edit."""

    id: int
    job_id: str
    seq: int
    channel: int
    speaker: str
    start: float
    end: float
    text: str
    words: list[dict[str, Any]] = field(default_factory=list)  # word, start, end, confidence
    speech_final: bool = True
    language: str | None = None
    confidence: float | None = None
    original_text: str | None = None
    original_speaker: str | None = None
    edited_at: float | None = None

    def final_event(self) -> dict[str, Any]:
        """This segment as the `final` event the sockets sent (Final.to_dict() shape), for sinks
        that read finals back from the store: a dashboard's catch-up, webhook crash recovery."""
        d = {"type": "final", "text": self.text, "words": self.words, "channel": self.channel,
             "speaker": self.speaker, "start": round(self.start, 3), "end": round(self.end, 3),
             "speech_final": self.speech_final}
        if self.language:
            d["language"] = self.language
        if self.confidence is not None:
            d["confidence"] = round(self.confidence, 4)
        return d

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "seq": self.seq, "channel": self.channel, "speaker": self.speaker,
             "start": self.start, "end": self.end, "text": self.text, "words": self.words,
             "speech_final": self.speech_final, "language": self.language, "confidence": self.confidence}
        if self.edited_at is not None:
            d.update(original_text=self.original_text, original_speaker=self.original_speaker,
                     edited_at=self.edited_at)
        return d


def is_unsafe_char(c: str) -> bool:
    """True for a character no label or transcript line may hold (see `_UNSAFE_CATEGORIES`)."""
    return c in _BIDI_CONTROLS or unicodedata.category(c) in _UNSAFE_CATEGORIES


class InvalidText(ValueError):
    """A speaker label or segment text from a client that cannot be stored; the message names it."""


def check_label(value: object, where: str) -> str:
    """A speaker label as given, or InvalidText: a non-empty single line of printable characters
    of at most MAX_LABEL_CHARS. Checked where labels come in (start metadata, PATCH), so every
    export and event can carry them as they are."""
    return _check_line(value, where, MAX_LABEL_CHARS, nonempty=True)


def check_text(value: object, where: str) -> str:
    """Edited segment text as given, or InvalidText: a string of at most MAX_TEXT_CHARS without
    control characters or line breaks (a segment is one utterance; exports lay out the lines)."""
    return _check_line(value, where, MAX_TEXT_CHARS, nonempty=False)


def _check_line(value: object, where: str, max_chars: int, *, nonempty: bool) -> str:
    if not isinstance(value, str) or (nonempty and not value.strip()):
        raise InvalidText(f"{where} must be a {'non-empty ' if nonempty else ''}string")
    if len(value) > max_chars:
        raise InvalidText(f"{where} must be at most {max_chars} characters, got {len(value)}")
    bad = next((c for c in value if is_unsafe_char(c)), None)
    if bad is not None:
        raise InvalidText(f"{where} must be one line without control characters, got U+{ord(bad):04X}")
    return value


def _b32(n: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_CROCKFORD[n & 31])
        n >>= 5
    return "".join(reversed(out))


def new_job_id() -> str:
    """"job_" + 26-char ULID (48-bit ms time + 80 random bits), so ids sort by creation time.

    Within one millisecond the random part is incremented (monotonic ULID) so ids made in a
    burst in this process still sort in creation order.
    """
    global _last_ms, _last_rand
    with _ulid_lock:
        ms = int(time.time() * 1000)
        if ms <= _last_ms:
            ms = _last_ms
            rand = (_last_rand + 1) & ((1 << 80) - 1)
        else:
            rand = int.from_bytes(os.urandom(10), "big")
        _last_ms, _last_rand = ms, rand
    return "job_" + _b32(ms, 10) + _b32(rand, 16)
