"""The frames a live session exchanges with its client, the same on the stream socket and the
WebRTC data channel (docs/stream-protocol.md): `ready`, the bus events as they go out (`partial`,
`final`, `usage`, `dtmf`), `completed`; and the client's controls coming in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge.calls import Call
from bridge.events.types import EventType
from bridge.json_input import JsonInputError, parse_json
from bridge.recognizer.streamer import ENDPOINTING_RANGE
from bridge.sessions.errors import ErrorCode, SessionError, shown
from bridge.sessions.start import StartConfig

__all__ = ["STREAM_CONTROLS", "ControlChannel", "completed_frame", "ready_frame", "wire_frame"]


def ready_frame(call: Call, start: StartConfig, config: dict[str, Any]) -> dict[str, Any]:
    """`ready`: the job exists and audio is welcome. `config` is the effective config as this
    ingress reports it (the stream's `start.effective()`, WebRTC's without the wire fields)."""
    ready = {"type": "ready", "job_id": call.id, "session_id": call.session_id,
             "max_duration_seconds": start.max_duration_seconds, "config": config}
    if start.warnings:
        ready["warnings"] = list(start.warnings)
    return ready


def wire_frame(event: Any, interim: bool) -> dict[str, Any] | None:
    """A bus event as the client sees it (partials only if asked), or None for lifecycle events."""
    t = event.type
    if t in (EventType.CALL_STARTED, EventType.CALL_ENDED) or (t is EventType.PARTIAL and not interim):
        return None
    return event.to_dict()


def completed_frame(call: Call, *, server_shutdown: bool = False) -> dict[str, Any]:
    """`server_shutdown`: the server ended the session at its shutdown, before the client's `end`
    or `bye`, so the job holds only what arrived until then (a data channel has no close code)."""
    frame = {"type": "completed", "job_id": call.id, "streamed_seconds": round(call.streamed_seconds, 3),
             "credits_used": round(call.credits_used, 2),
             "transcript_path": f"/v1/jobs/{call.id}/transcript", "job_path": f"/v1/jobs/{call.id}"}
    if server_shutdown:
        frame["server_shutdown"] = True
    return frame


@dataclass(frozen=True)
class ControlChannel:
    """How one ingress's client controls arrive: which types end the session (`ends`), and the
    wording of its refusals, which each ingress's clients already know (docs/stream.md,
    docs/webrtc.md). The controls themselves are the same."""

    message: str = "text frame"  # what one message is called ("... refused: <why>")
    kind: str = "frame"  # "unknown <kind> type ..."
    ends: tuple[str, ...] = ("end",)
    not_object: str = 'a text frame must be a JSON object with a string "type"'
    expected: str = "keep_alive, force_endpoint, configure or end"
    second_start: bool = True  # a repeated `start` is named as such (the socket's first frame is one)

    def parse(self, data: str | bytes) -> dict[str, Any]:
        """A control message's JSON; SessionError(INVALID_CONFIG) unless an object with a string `type`."""
        try:
            msg = parse_json(data)
        except JsonInputError as e:
            raise SessionError(ErrorCode.INVALID_CONFIG, f"{self.message} refused: {e}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise SessionError(ErrorCode.INVALID_CONFIG, self.not_object)
        return msg

    def apply(self, call: Call, ctl: dict[str, Any]) -> bool:
        """Apply a parsed control; True when it ends the session.
        Raises SessionError(INVALID_CONFIG) for a bad value or an unknown type."""
        kind = ctl["type"]
        if kind in self.ends:
            return True
        if kind == "keep_alive":
            return False
        if kind == "force_endpoint":
            call.force_endpoint()
            return False
        if kind == "configure":
            v = ctl.get("endpointing_ms")
            lo, hi = ENDPOINTING_RANGE
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise SessionError(ErrorCode.INVALID_CONFIG,
                                   f"configure.endpointing_ms must be an integer in {lo}..{hi}, got {shown(v)}")
            call.configure(v)
            call.log.info("configured", endpointing_ms=v)
            return False
        if kind == "start" and self.second_start:
            raise SessionError(ErrorCode.INVALID_CONFIG, "start was already received; one start per session")
        raise SessionError(ErrorCode.INVALID_CONFIG, f"unknown {self.kind} type {shown(kind)}; expected {self.expected}")


STREAM_CONTROLS = ControlChannel()
