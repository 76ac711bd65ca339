"""Webhook signatures: `X-Signature: sha256=<hex HMAC-SHA256(secret, X-Timestamp + "." + body)>`.

`verify` is what a receiver runs (docs/events.md shows the same in a few lines of stdlib code).
The timestamp is inside the signed text, so a captured delivery cannot be replayed later with a
fresh timestamp; receivers reject timestamps older than their tolerance.
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["DEFAULT_TOLERANCE_S", "sign", "verify"]

DEFAULT_TOLERANCE_S = 300


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str | None, body: bytes, signature: str | None, *,
           tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> bool:
    """True when `signature` is ours for exactly these bytes and the timestamp is fresh."""
    if not timestamp or not signature:
        return False
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)
