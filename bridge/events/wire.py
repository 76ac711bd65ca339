"""Envelopes as bytes for a shared bus: one JSON object per envelope, events unrounded, so the node
that reads it holds an Envelope equal to the one the publishing node fanned out."""

from __future__ import annotations

import json
from typing import Any

from .bus import Envelope
from .types import event_fields, event_from_dict

__all__ = ["decode_envelope", "encode_envelope"]


def encode_envelope(env: Envelope) -> bytes:
    return json.dumps({"job_id": env.job_id, "seq": env.seq, "owner": env.owner, "source": env.source,
                       "node_id": env.node_id, "event": event_fields(env.event)},
                      separators=(",", ":")).encode()


def decode_envelope(data: bytes | str) -> Envelope:
    """The Envelope `encode_envelope` wrote; ValueError for anything else (another program's
    message on the stream, a newer version's event type)."""
    try:
        d: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("job_id"), str) or type(d.get("seq")) is not int:
        raise ValueError("not an envelope: job_id (text) and seq (integer) are required")
    return Envelope(d["job_id"], d["seq"], event_from_dict(d.get("event")), str(d.get("owner", "")),
                    str(d.get("source", "")), str(d.get("node_id", "")))
