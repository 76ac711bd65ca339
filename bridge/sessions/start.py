"""A session's start configuration: the stream socket's `start` frame, which the WebRTC offer's
`config` reuses (docs/stream-protocol.md), validated once for every ingress.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any


from bridge.audio.codecs import InvalidAudioConfig
from bridge.audio.frontend import AudioFormat
from bridge.jobs.model import InvalidText, check_label, is_unsafe_char
from bridge.recognizer.streamer import ENDPOINTING_RANGE, StreamerConfig
from bridge.sessions.errors import ErrorCode, SessionError, shown

__all__ = ["MAX_METADATA_BYTES", "MAX_WORD_BOOST", "StartConfig", "streamer_config"]

MAX_WORD_BOOST = 100
MAX_METADATA_BYTES = 16384


_START_FIELDS = {"type", "language", "sample_rate", "channels", "encoding", "interim_results", "diarize",
                 "endpointing_ms", "word_boost", "metadata", "max_duration_seconds"}


@dataclass(frozen=True)
class StartConfig:
    """The validated `start` frame. `max_duration_seconds` (ours) lowers the server's limit for a
    session, so a key with a small balance can reserve less than the default 3 hours."""

    language: str = "en"
    sample_rate: int = 16000
    channels: int = 1
    encoding: str = "pcm_s16le"
    interim_results: bool = True
    diarize: bool = False
    endpointing_ms: int = 700
    word_boost: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    speakers: tuple[str, ...] = ("ch0",)
    max_duration_seconds: float = 10800.0
    warnings: tuple[str, ...] = ()

    @property
    def audio_format(self) -> AudioFormat:
        return AudioFormat(self.encoding, self.sample_rate, self.channels)

    def effective(self) -> dict[str, Any]:
        """What `ready` reports: every setting as the session will run it."""
        return {"language": self.language, "sample_rate": self.sample_rate, "channels": self.channels,
                "encoding": self.encoding, "interim_results": self.interim_results, "diarize": self.diarize,
                "endpointing_ms": self.endpointing_ms, "word_boost": list(self.word_boost),
                "speakers": list(self.speakers), "metadata": self.metadata}

    @classmethod
    def parse(cls, msg: Any, *, default_endpointing_ms: int, max_duration_s: float,
              multilingual: bool, languages: frozenset[str]) -> "StartConfig":
        """Validate a decoded `start` frame; raises SessionError(INVALID_CONFIG) naming the field."""

        def bad(message: str) -> SessionError:
            return SessionError(ErrorCode.INVALID_CONFIG, message)

        if not isinstance(msg, dict) or msg.get("type") != "start":
            raise bad('the first frame must be a JSON text frame {"type": "start", ...}')
        unknown = sorted(set(msg) - _START_FIELDS)
        warnings = [f"unknown field {shown(k, 40)} ignored" for k in unknown[:20]]

        def typed(name: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
            v = msg.get(name, default)
            if v is None:
                return default
            if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
                raise bad(f"{name} must be {what}, got {shown(v)}")
            return v

        language = typed("language", (str,), "en", 'a language code or "auto"').strip().lower()
        if language != "auto" and language not in languages:
            raise bad(f'language {shown(language)} is not a whisper language code (e.g. "en", "de") or "auto"')
        if not multilingual and language not in ("en", "auto"):
            raise bad(f'language {shown(language)} needs a multilingual model; this server runs an English-only '
                      f'model (use "en" or "auto", or start the server with --model base)')
        encoding = typed("encoding", (str,), "pcm_s16le", "a string")
        sample_rate = typed("sample_rate", (int,), 16000, "an integer (Hz)")
        channels = typed("channels", (int,), 1, "1 or 2")
        try:
            fmt = AudioFormat(encoding, sample_rate, channels).validate()
        except InvalidAudioConfig as e:
            raise bad(str(e)) from None
        interim = typed("interim_results", (bool,), True, "true or false")
        diarize = typed("diarize", (bool,), False, "true or false")
        if diarize:
            warnings.append("diarize: speakers are told apart by channel, not within one channel")
        endpointing = typed("endpointing_ms", (int,), default_endpointing_ms, "an integer (milliseconds)")
        lo, hi = ENDPOINTING_RANGE
        if not lo <= endpointing <= hi:
            raise bad(f"endpointing_ms must be in {lo}..{hi}, got {endpointing}")
        boost = typed("word_boost", (list,), [], "a list of strings")
        if len(boost) > MAX_WORD_BOOST or not all(isinstance(w, str) and 0 < len(w.strip()) <= 100
                                                  and not any(is_unsafe_char(c) for c in w) for w in boost):
            raise bad(f"word_boost must be at most {MAX_WORD_BOOST} non-empty strings of up to 100 characters, "
                      "without control characters")
        metadata = typed("metadata", (dict,), {}, "a JSON object")
        if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
            raise bad(f"metadata must be under {MAX_METADATA_BYTES} bytes of JSON")
        speakers: tuple[str, ...] = tuple(f"ch{i}" for i in range(fmt.channels))
        if "speakers" in metadata:
            sp = metadata["speakers"]
            if not isinstance(sp, list) or len(sp) != fmt.channels:
                raise bad(f"metadata.speakers must be a list of {fmt.channels} non-empty label(s), one per channel")
            for i, label in enumerate(sp):
                try:
                    check_label(label, f"metadata.speakers[{i}]")
                except InvalidText as e:
                    raise bad(str(e)) from None
            if len(set(sp)) != len(sp):
                raise bad("metadata.speakers labels must differ")
            speakers = tuple(s.strip() for s in sp)
        max_dur = typed("max_duration_seconds", (int, float), max_duration_s, "a number of seconds")
        if not 0 < max_dur <= max_duration_s:
            raise bad(f"max_duration_seconds must be in (0, {max_duration_s:g}], got {max_dur}")
        return cls(language=language, sample_rate=fmt.sample_rate, channels=fmt.channels,
                   encoding=fmt.encoding.value, interim_results=interim, diarize=diarize,
                   endpointing_ms=endpointing, word_boost=tuple(w.strip() for w in boost), metadata=metadata,
                   speakers=speakers, max_duration_seconds=float(max_dur), warnings=tuple(warnings))


def streamer_config(defaults: dict[str, Any], start: StartConfig) -> StreamerConfig:
    """The recognizer settings of a session: the server's `defaults` (RecognizerConfig.streamer_kwargs)
    with the start fields applied."""
    return replace(StreamerConfig(**defaults), endpointing_ms=start.endpointing_ms,
                   interim_results=start.interim_results, language=start.language, word_boost=start.word_boost)
