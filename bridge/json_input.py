"""Untrusted JSON from clients, decoded safely: REST bodies, socket and data channel frames.

Below the HTTP layer so the session layer (bridge/sessions/) parses control frames with it too.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "JsonInputError", "parse_json"]

MAX_JSON_DEPTH = 32  # arrays/objects inside each other; no body or frame of ours needs more than 4
MAX_JSON_BYTES = 1 << 20


class JsonInputError(ValueError):
    """Untrusted JSON refused: malformed, not UTF-8, too large, nested too deep, or holding a
    number JSON cannot carry (NaN, Infinity, 1e999, an integer of thousands of digits)."""


# Only a number with 300+ digits or a 3-digit exponent can overflow a double; text without one
# is parsed at C speed, text with one has every float checked.
_HUGE_NUMBER = re.compile(r"[0-9]{300}|[eE][+-]?[0-9]{3}")


def _no_constant(name: str) -> Any:
    raise JsonInputError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonInputError(f"the number {text[:40]} is out of range")
    return value


def _check_depth(value: Any, max_depth: int) -> None:
    stack = [(value, 1)]
    while stack:  # iterative: the check itself must not recurse
        v, depth = stack.pop()
        if isinstance(v, dict):
            children: Any = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if depth > max_depth:
            raise JsonInputError(f"nested deeper than {max_depth} levels")
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def parse_json(data: str | bytes, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode untrusted JSON, or raise JsonInputError with a short message saying why.

    Every JSON a client sends goes through here (REST bodies, `start` and control frames, the
    WebRTC offer and data channel): `json.loads` alone raises RecursionError on deep nesting,
    ValueError on huge integers and returns inf/NaN, each of which became a 500 or a traceback."""
    if len(data) > max_bytes:
        raise JsonInputError(f"over {max_bytes} bytes")
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonInputError(f"not UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(data, parse_constant=_no_constant,
                           parse_float=_finite if _HUGE_NUMBER.search(data) else None)
    except JsonInputError:
        raise
    except json.JSONDecodeError as e:
        raise JsonInputError(f"malformed JSON: {e.msg} at char {e.pos}") from None
    except RecursionError:
        raise JsonInputError(f"nested deeper than {max_depth} levels") from None
    except ValueError as e:  # an integer beyond int_max_str_digits
        raise JsonInputError(f"malformed JSON: {str(e)[:80]}") from None
    if data.count("[") + data.count("{") > max_depth:  # fewer brackets than that cannot nest deeper
        _check_depth(value, max_depth)
    return value
