"""How the commands print: aligned tables for people, indented JSON for `--json`."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["json_text", "table"]


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)


def table(header: list[str] | tuple[str, ...], rows: list[Any]) -> list[str]:
    """Columns as wide as their widest cell, two spaces apart; the last one is not padded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(r, widths)), r[-1]]).rstrip() for r in [header, *rows]]
