"""Word-level helpers for committing long utterances piece by piece.

LocalAgreement (Macháček et al., whisper_streaming): a word is stable once two consecutive
hypotheses over a growing buffer agree on it; the agreed prefix can be committed and cut from
the buffer. Comparison ignores case and punctuation, which whisper changes freely between
decodes ("order," vs "order").
"""

from __future__ import annotations

import re
from typing import Sequence

from ..events.types import Word

_NON_WORD = re.compile(r"[^\w']+", re.UNICODE)


def norm(word: str) -> str:
    return _NON_WORD.sub("", word.lower()).strip("'")


def norm_text(text: str) -> str:
    """Lowercase words without punctuation, single-spaced: for comparing whole texts."""
    return " ".join(n for n in (norm(w) for w in text.split()) if n)


def agreed_prefix(prev: Sequence[Word], cur: Sequence[Word]) -> int:
    """Length of the longest common prefix of two hypotheses, by normalized word."""
    n = 0
    for a, b in zip(prev, cur):
        if norm(a.word) != norm(b.word):
            break
        n += 1
    return n


def drop_seam_repeats(committed: Sequence[Word], new: Sequence[Word], seam: float, window: float = 0.8) -> list[Word]:
    """Remove words at the start of `new` that repeat the tail of `committed`.

    After a cut, the next decode sometimes re-hears the last committed word because whisper's
    timestamps are ~0.1 s coarse. A repeat counts only if it lies within `window` seconds of
    the seam, so a speaker who really repeats a phrase later is left alone.
    """
    new = list(new)
    for k in range(min(3, len(committed), len(new)), 0, -1):
        tail = [norm(w.word) for w in committed[-k:]]
        head = [norm(w.word) for w in new[:k]]
        if tail == head and new[k - 1].start <= seam + window:
            return new[k:]
    return new


def words_text(words: Sequence[Word]) -> str:
    return " ".join(w.word for w in words).strip()
