"""How `callbridge stream` and `callbridge webrtc` print a live transcript."""

from __future__ import annotations

import json
import sys
from typing import IO

__all__ = ["Printer"]


class Printer:
    """Partials overwrite the current line on a terminal; finals are printed for good."""

    def __init__(self, as_json: bool, out: IO[str] = sys.stdout) -> None:
        self.json = as_json
        self.out = out
        self.tty = out.isatty()
        self.width = 0

    def event(self, ev: dict) -> None:
        if self.json:
            print(json.dumps(ev), file=self.out, flush=True)
            return
        t = ev.get("type")
        if t == "partial" and self.tty:
            line = f"  [{ev['speaker']}] {ev['text']}"[:160]
            self.out.write("\r\x1b[K" + line)
            self.out.flush()
        elif t == "final" and ev.get("text"):
            m, s = divmod(ev["start"], 60)
            self.out.write(("\r\x1b[K" if self.tty else "") + f"[{int(m):02d}:{s:04.1f}] {ev['speaker']}: {ev['text']}\n")
            self.out.flush()
        elif t == "error":
            print(f"\nerror {ev.get('code')}: {ev.get('message')}", file=sys.stderr)

    def finish(self, completed: dict | None, cut_short: bool = False, sent_s: float = 0.0) -> None:
        """The last line, once the close code says whether `completed` was the end we asked for."""
        if completed is None:
            return
        if cut_short:
            print(f"callbridge: error: the server shut down before the stream ended: job {completed['job_id']} "
                  f"kept {completed['streamed_seconds']:.1f} s of the {sent_s:.1f} s sent "
                  f"(transcript: {completed['transcript_path']})", file=sys.stderr)
        elif not self.json:
            print(f"completed: job {completed['job_id']}, {completed['streamed_seconds']:.1f} s, "
                  f"{completed['credits_used']} credits (transcript: {completed['transcript_path']})", file=sys.stderr)
