"""The control channel between a SIP worker process and the service (a Unix stream socket).

Each message is one frame: 4-byte big-endian header length, 4-byte big-endian payload length,
the header as UTF-8 JSON (an object with a string "type"), then the payload bytes (audio only).
Workers connect to the service's socket and speak first (`hello`).

worker -> service
  hello         {worker: int, sip_port: int, max_calls: int, pid: int}
  call_started  {call: str, legs: ["caller"] | ["caller", "agent"], sip: {call_id, from, to,
                 request_uri, contact, remote, headers: {"X-...": "..."}}, codec: "PCMU/8000",
                 target: str | null}      (sent when the call is answered / the bridge is up)
  audio         {call, leg: int}  payload: PCM16 little-endian mono 16 kHz (one or more 20 ms frames)
  dtmf          {call, leg: int, digit: "0-9*#A-D", duration_ms: int, at: float (unix time)}
  call_ended    {call, reason: "bye_caller" | "bye_agent" | "cancel" | "rtp_timeout" | "hangup"
                 | "error" | "shutdown", sip_code: int | null, detail: str}
  load          {calls: int, slots_used: int}   (after every change; slots_used is what pjsua holds,
                                                 hung-up calls still finishing their SIP too)
  log           {level, event, ...}             (optional: forwarded into the service's log)

service -> worker
  hangup        {call, reason: "max_duration" | "shutdown" | "request"}
  shutdown      {}                              (hang up everything, exit 0)

A call's `call` reference is unique per worker ("w<worker>-<n>"); legs are channels: 0 is the
caller (the party that sent the INVITE), 1 the agent (the bridged target) when bridged.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

__all__ = ["encode", "read_message", "MessageError", "MAX_HEADER", "MAX_PAYLOAD", "SAMPLE_RATE", "FRAME_SAMPLES"]

SAMPLE_RATE = 16000
FRAME_SAMPLES = 320  # 20 ms at 16 kHz
MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 1 << 20
_PREFIX = struct.Struct(">II")


class MessageError(Exception):
    """A frame that breaks the framing rules: the connection cannot be trusted any more."""


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    if len(h) > MAX_HEADER or len(payload) > MAX_PAYLOAD:
        raise MessageError(f"message too large: header {len(h)} bytes, payload {len(payload)} bytes")
    return _PREFIX.pack(len(h), len(payload)) + h + payload


async def read_message(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes] | None:
    """The next (header, payload), or None at a clean end of stream."""
    try:
        prefix = await reader.readexactly(_PREFIX.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise MessageError("connection closed inside a frame prefix") from None
    hlen, plen = _PREFIX.unpack(prefix)
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
        raise MessageError(f"frame too large: header {hlen} bytes, payload {plen} bytes")
    try:
        raw = await reader.readexactly(hlen + plen)
    except asyncio.IncompleteReadError:
        raise MessageError("connection closed inside a frame") from None
    try:
        header = json.loads(raw[:hlen])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MessageError(f"frame header is not JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise MessageError("frame header must be an object with a string type")
    return header, raw[hlen:]
