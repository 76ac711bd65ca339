"""Why a session was refused or ended, as every ingress reports it (docs/stream-protocol.md).

One `SessionError` per reason, with the protocol's code; each ingress renders it its own way:
an `error` frame and a 4xxx close on the stream socket, the same frame on the WebRTC data channel
(or an HTTP status for a refused offer), a SIP final response for a refused INVITE.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from bridge.admission import CapacityRefused
from bridge.jobs.model import JobStatus
from bridge.storage import StorageFull, is_storage_full

__all__ = ["CLOSE_CODES", "CLOSE_GOING_AWAY", "CLOSE_NORMAL", "HTTP_STATUS", "MAX_MESSAGE_CHARS", "ErrorCode",
           "SessionError", "failure_error", "job_ending", "shown"]


class ErrorCode(str, Enum):
    INVALID_CONFIG = "INVALID_CONFIG"
    INVALID_AUDIO = "INVALID_AUDIO"
    INSUFFICIENT_CREDITS = "INSUFFICIENT_CREDITS"
    MAX_DURATION_REACHED = "MAX_DURATION_REACHED"
    IDLE_TIMEOUT = "IDLE_TIMEOUT"
    RATE_LIMITED = "RATE_LIMITED"
    UPSTREAM_ERROR = "UPSTREAM_ERROR"
    INTERNAL = "INTERNAL"
    STORAGE_FULL = "STORAGE_FULL"  # ours: the data directory is full (or under its reserve)


# WebSocket close codes after an `error` frame (4000-4999 is the application range), HTTP-like.
CLOSE_CODES: dict[ErrorCode, int] = {
    ErrorCode.INVALID_CONFIG: 4400,
    ErrorCode.INSUFFICIENT_CREDITS: 4402,
    ErrorCode.IDLE_TIMEOUT: 4408,
    ErrorCode.MAX_DURATION_REACHED: 4413,
    ErrorCode.INVALID_AUDIO: 4415,
    ErrorCode.RATE_LIMITED: 4429,
    ErrorCode.INTERNAL: 4500,
    ErrorCode.UPSTREAM_ERROR: 4502,
    ErrorCode.STORAGE_FULL: 4507,
}
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the server is shutting down (the session was still completed and saved)

# The HTTP status of a refusal answered over HTTP (a WebRTC offer), unless the error names its own.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_CONFIG: 400, ErrorCode.INSUFFICIENT_CREDITS: 402, ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UPSTREAM_ERROR: 503, ErrorCode.INTERNAL: 500, ErrorCode.STORAGE_FULL: 507}

# A session that reached one of these still has a complete transcript of what it received.
_COMPLETING = {ErrorCode.MAX_DURATION_REACHED, ErrorCode.IDLE_TIMEOUT}

MAX_MESSAGE_CHARS = 300  # an error message quotes client values; it stays one short line


class SessionError(Exception):
    """`retry_after_s`: the refusal is temporary (sent as `retry_after_s` in the frame, Retry-After over
    HTTP and SIP); `http_status`: what an HTTP ingress answers instead of the code's usual status."""

    def __init__(self, code: ErrorCode, message: str, *, retry_after_s: int | None = None,
                 http_status: int | None = None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "..."
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.http_status = http_status

    @classmethod
    def over_capacity(cls, refused: CapacityRefused) -> "SessionError":
        """The server has no decode capacity for the session: RATE_LIMITED on the socket, 503 over HTTP."""
        return cls(ErrorCode.RATE_LIMITED, refused.reason, retry_after_s=refused.retry_after_s, http_status=503)

    @property
    def server_busy(self) -> bool:
        """The refusal is about the whole server (capacity, disk, shutdown), not this owner or request."""
        return self.http_status == 503 or self.code in (ErrorCode.STORAGE_FULL, ErrorCode.UPSTREAM_ERROR)

    def frame(self) -> dict[str, Any]:
        out = {"type": "error", "code": self.code.value, "message": self.message}
        if self.retry_after_s is not None:
            out["retry_after_s"] = self.retry_after_s
        return out

    def saved(self) -> dict[str, Any]:
        """What the job keeps as its `error`."""
        return {"code": self.code.value, "message": self.message}


def failure_error(exc: BaseException) -> SessionError:
    """The error a session ends with when its call failed under it (`Call.failure`) or a step
    raised: STORAGE_FULL for a full disk, else INTERNAL. Audio and finals until then are saved."""
    if is_storage_full(exc):
        msg = exc.message if isinstance(exc, StorageFull) else "the server's disk is full; what was received is saved"
        return SessionError(ErrorCode.STORAGE_FULL, msg)
    return SessionError(ErrorCode.INTERNAL, "the recognizer failed; what was received is saved")


def job_ending(err: SessionError | None) -> tuple[JobStatus, dict[str, Any] | None]:
    """The job status and saved error for a session that ended with `err` (None: a clean end).
    Limits reached still leave a complete transcript of what was received: completed."""
    if err is None:
        return JobStatus.COMPLETED, None
    status = JobStatus.COMPLETED if err.code in _COMPLETING else JobStatus.FAILED
    return status, err.saved()


def shown(value: Any, limit: int = 60) -> str:
    """A client's value quoted in an error message, cut short: a refusal stays one short line."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
