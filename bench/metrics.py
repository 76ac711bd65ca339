"""Latency figures from a recorded leg run (see bench/drive.py) and a call's known speech spans."""

from __future__ import annotations

import difflib

import numpy as np

from bridge.events.types import Final, Partial, Word
from bridge.recognizer.agreement import norm

from .calls import Call
from .drive import LegRun


def final_latencies(run: LegRun, call: Call) -> list[float]:
    """For each speech_final final: wall time of the final minus when the speech really ended."""
    pace = run.pace or 1.0
    out = []
    for s in run.events:
        ev = s.event
        if not (isinstance(ev, Final) and ev.speech_final):
            continue
        ends = [e for (b, e) in call.spans if b < ev.end]
        if not ends:
            continue
        out.append(s.wall - ends[-1] / pace)
    return out


def first_shown(run: LegRun) -> list[tuple[Word, float]]:
    """Every final word with the wall time it first showed (in a partial or, failing that, the
    final); a word counts as shown in an event that has it within two positions of its place."""
    out: list[tuple[Word, float]] = []
    window: list[tuple[float, list[str]]] = []  # partials since the last final
    for s in run.events:
        ev = s.event
        if isinstance(ev, Partial):
            window.append((s.wall, [norm(w) for w in ev.text.split()]))
            continue
        if not isinstance(ev, Final):
            continue
        cands = window + [(s.wall, [norm(w.word) for w in ev.words])]
        for i, w in enumerate(ev.words):
            target = norm(w.word)
            first = s.wall
            for wall, words in cands:
                if target in words[max(0, i - 2) : i + 3]:
                    first = wall
                    break
            out.append((w, first))
        window = []
    return out


def partial_lags(run: LegRun) -> list[float]:
    """Per final word: when it first showed minus when it was spoken, by the recognizer's own
    account (the word's end time in the final: whisper's timestamp, ~0.1 s coarse)."""
    pace = run.pace or 1.0
    return [first - w.end / pace for w, first in first_shown(run)]


def partial_lags_true(run: LegRun, call: Call) -> tuple[list[float], int]:
    """Per final word that matches the script: when it first showed minus when the synthesizer
    really ended it (Call.word_ends). Returns (lags, words not matched, which are left out).

    Final words are aligned to the script's words (normalized) with difflib; a misheard or
    reformatted word ("9" for "nine") has no true time and is not scored."""
    pace = run.pace or 1.0
    shown = first_shown(run)
    hyp = [norm(w.word) for w, _ in shown]
    ref = [norm(w) for w, _ in call.word_ends]
    lags = []
    for blk in difflib.SequenceMatcher(None, hyp, ref, autojunk=False).get_matching_blocks():
        for k in range(blk.size):
            lags.append(shown[blk.a + k][1] - call.word_ends[blk.b + k][1] / pace)
    return lags, len(hyp) - len(lags)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")
