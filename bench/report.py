"""Print a benchmark's table and keep a copy under bench/out/ for docs/benchmarks.md."""

from __future__ import annotations

import platform
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def emit_table(name: str, title: str, headers: list[str], rows: list[list[str]], notes: list[str] = ()) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    text = f"{title}\n({stamp} UTC, {platform.processor() or platform.machine()})\n\n{format_table(headers, rows)}\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    print(text, flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.txt").write_text(text)
    return text
