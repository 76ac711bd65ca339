"""Transcript exports (json, txt, srt, vtt) as pure functions of a job and its segments.

Segments carry the edited text, so human corrections show in every format.

Labels and text are checked where they come in (bridge.jobs.model.check_label/check_text), but a
value stored before those checks, or by another path, must still not be able to add cues: the
text formats never copy a line break, control character or bidi override out of a label or a
segment (they become spaces), SRT lines never hold `-->`, and VTT escapes `&`, `<` and `>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bridge.jobs.model import MAX_LABEL_CHARS, Job, Segment, is_unsafe_char

MAX_LINE = 42  # broadcast subtitle convention: at most 2 lines of 42 characters per cue
MAX_LINES = 2
_MAX_LABEL = 20  # keep the "speaker: " prefix from eating a whole SRT line

CONTENT_TYPES = {
    "json": "application/json",
    "txt": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


def _one_line(s: str) -> str:
    """`s` with every unsafe character (line breaks, controls, bidi overrides) turned into a space
    and runs of whitespace collapsed: one line of plain text, whatever was stored."""
    return " ".join("".join(" " if is_unsafe_char(c) else c for c in s).split())


def _label(speaker: str, cap: int = MAX_LABEL_CHARS) -> str:
    return _one_line(speaker)[:cap].strip()


def _words(text: str) -> list[str]:
    return _one_line(text).split()


def _visible(segs: list[Segment]) -> list[Segment]:
    return sorted((s for s in segs if s.text and s.text.strip()), key=lambda s: (s.start, s.channel, s.seq))


def to_json(job: Job, segs: list[Segment]) -> dict[str, Any]:
    """The spec's transcript object: {"job_id", "speakers", "segments": [...]}."""
    return {
        "job_id": job.id,
        "speakers": list(job.speakers),
        "segments": [{"start": s.start, "end": s.end, "channel": s.channel, "speaker": s.speaker,
                      "text": s.text, "words": list(s.words)} for s in _visible(segs)],
    }


def _clock(t: float, sep: str, digits: int = 3) -> str:
    scale = 10 ** digits
    n = round(max(0.0, t) * scale)
    frac = n % scale
    secs = n // scale
    return f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}{sep}{frac:0{digits}d}"


def to_txt(job: Job, segs: list[Segment]) -> str:
    """One line per segment: "[HH:MM:SS.cc] speaker: text"."""
    lines = [f"[{_clock(s.start, '.', 2)}] {_label(s.speaker)}: {' '.join(_words(s.text))}" for s in _visible(segs)]
    return "\n".join(lines) + ("\n" if lines else "")


@dataclass
class Cue:
    start: float
    end: float
    speaker: str
    lines: list[str]


def _token_times(seg: Segment, tokens: list[str]) -> list[float]:
    """Start time of each token: from word timestamps when they still match the text, else by characters."""
    words = [w for w in seg.words if str(w.get("word", "")).strip()]
    if words and len(words) == len(tokens):
        return [min(max(float(w["start"]), seg.start), seg.end) for w in words]
    total = sum(len(t) + 1 for t in tokens) or 1
    span, pos, out = seg.end - seg.start, 0, []
    for t in tokens:
        out.append(seg.start + span * pos / total)
        pos += len(t) + 1
    return out


def _split_long(tokens: list[str], times: list[float], cap: int) -> tuple[list[str], list[float]]:
    """Hard-split any single word longer than a line (URLs, digit strings) so no line overflows."""
    out_t, out_s = [], []
    for tok, at in zip(tokens, times):
        while len(tok) > cap:
            out_t.append(tok[:cap])
            out_s.append(at)
            tok = tok[cap:]
        out_t.append(tok)
        out_s.append(at)
    return out_t, out_s


def _cues(seg: Segment, first_cap: int) -> list[Cue]:
    """Split one segment into cues of <= 2 lines at word boundaries; cues tile [start, end] in order.

    `first_cap` is the room on a cue's first line (less than MAX_LINE when a speaker prefix is shown).
    """
    tokens = _words(seg.text)
    tokens, times = _split_long(tokens, _token_times(seg, tokens), min(first_cap, MAX_LINE))
    groups: list[tuple[list[str], int]] = []  # (lines, index of first token)
    i = 0
    while i < len(tokens):
        first = i
        lines: list[str] = []
        while i < len(tokens) and len(lines) < MAX_LINES:
            cap = first_cap if not lines else MAX_LINE
            line = tokens[i]
            i += 1
            while i < len(tokens) and len(line) + 1 + len(tokens[i]) <= cap:
                line += " " + tokens[i]
                i += 1
            lines.append(line)
        groups.append((lines, first))
    cues, prev = [], seg.start
    for k, (lines, first) in enumerate(groups):
        start = prev
        if k + 1 < len(groups):
            end = min(max(times[groups[k + 1][1]], start), seg.end)
        else:
            end = max(seg.end, start)
        cues.append(Cue(start, end, seg.speaker, lines))
        prev = end
    return cues


def _prefix(speaker: str) -> str:
    label = _label(speaker, _MAX_LABEL)
    return f"{label}: " if label else ""


def _srt_line(line: str) -> str:
    # a line holding "-->" reads as a timing line to lenient SRT parsers
    return line.replace("-->", "->")


def to_srt(job: Job, segs: list[Segment]) -> str:
    """SubRip; every cue starts with "speaker: " (counted in the 42-character first line)."""
    blocks, n = [], 0
    for seg in _visible(segs):
        pre = _prefix(seg.speaker)
        for cue in _cues(seg, MAX_LINE - len(pre)):
            n += 1
            text = "\n".join(_srt_line(x) for x in [pre + cue.lines[0], *cue.lines[1:]])
            blocks.append(f"{n}\n{_clock(cue.start, ',')} --> {_clock(cue.end, ',')}\n{text}\n")
    return "\n".join(blocks)


def _vtt_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(job: Job, segs: list[Segment]) -> str:
    """WebVTT; the speaker is a `<v speaker>` voice tag, so lines carry only spoken text."""
    blocks = ["WEBVTT\n"]
    for seg in _visible(segs):
        label = _label(seg.speaker)
        tag = f"<v {_vtt_escape(label)}>" if label else ""
        for cue in _cues(seg, MAX_LINE):
            lines = [_vtt_escape(x) for x in cue.lines]
            lines[0] = tag + lines[0]
            blocks.append(f"{_clock(cue.start, '.')} --> {_clock(cue.end, '.')}\n" + "\n".join(lines) + "\n")
    return "\n".join(blocks)


def render(fmt: str, job: Job, segs: list[Segment]) -> tuple[str | bytes, str]:
    """(body, content type) for a `?format=` value; ValueError for anything else."""
    fmt = (fmt or "").lower()
    if fmt == "json":
        return json.dumps(to_json(job, segs), ensure_ascii=False), CONTENT_TYPES["json"]
    if fmt == "txt":
        return to_txt(job, segs), CONTENT_TYPES["txt"]
    if fmt == "srt":
        return to_srt(job, segs), CONTENT_TYPES["srt"]
    if fmt == "vtt":
        return to_vtt(job, segs), CONTENT_TYPES["vtt"]
    raise ValueError(f"unknown transcript format {fmt!r}; expected one of {sorted(CONTENT_TYPES)}")
