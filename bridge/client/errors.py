"""Errors the Python client raises, shared by the REST and streaming clients."""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError"]


class ApiError(Exception):
    """A non-2xx answer from the server, carrying its JSON `error.code` and `error.message`.

    Non-JSON bodies (a proxy's HTML page, say) still give a usable error: code `HTTP_<status>`
    and the start of the body as the message.
    """

    def __init__(self, status: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body

    @classmethod
    def from_body(cls, status: int, body: Any, text: str = "") -> ApiError:
        """Build from a parsed body of the API's `{"error": {"code", "message"}}` shape, if it is one."""
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            return cls(status, err["code"], str(err.get("message", "")), body)
        snippet = " ".join(text.split())[:200] or "(empty body)"
        return cls(status, f"HTTP_{status}", snippet, body)
