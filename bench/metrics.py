"""Latency figures from a recorded leg run (see bench/drive.py) and a call's known speech spans."""

from __future__ import annotations

import numpy as np

from bridge.events.types import Final, Partial
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


def partial_lags(run: LegRun) -> list[float]:
    """Per final word: when it first showed (partial or final) minus when it was spoken.

    'Spoken' is the word's end time in the final (whisper's timestamp, ~0.1 s coarse); a word
    counts as shown in an event that has the same word within two positions of its place.
    """
    pace = run.pace or 1.0
    lags: list[float] = []
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
            lags.append(first - w.end / pace)
        window = []
    return lags


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")
