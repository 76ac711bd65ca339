"""Number normalization for fair WER: "seven four two" and whisper's "742" count as equal.

Whisper writes numbers as digits, the test scripts spell them out. Both sides are reduced to
single digits: spelled runs become numbers ("forty two" -> 42, "seven four two" -> 7 4 2),
then every digit string is split into its digits ("742-918" -> 7 4 2 9 1 8).
"""

from __future__ import annotations

import re

UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
UNITS["oh"] = 0
TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
SCALES = {"hundred": 100, "thousand": 1000}


def _words_to_numbers(words: list[str]) -> list[str]:
    out: list[str] = []
    cur: int | None = None  # value being built
    last: str | None = None  # kind of the previous number word: unit / tens / scale

    def flush() -> None:
        nonlocal cur, last
        if cur is not None:
            out.append(str(cur))
        cur, last = None, None

    for w in words:
        if w in UNITS and not (w == "oh" and cur is None):
            v = UNITS[w]
            if cur is not None and last == "tens" and v < 10:
                cur += v
                last = "unit"
            elif cur is not None and last == "scale":
                cur += v
                last = "unit"
            else:
                flush()
                cur, last = v, "unit"
        elif w in TENS:
            if cur is not None and last == "scale":
                cur += TENS[w]
            else:
                flush()
                cur = TENS[w]
            last = "tens"
        elif w in SCALES and cur is not None:
            cur *= SCALES[w]
            last = "scale"
        else:
            flush()
            out.append(w)
    flush()
    return out


def normalize_numbers(words: list[str]) -> list[str]:
    """Spelled numbers to digits, then every digit string split into single digits."""
    out: list[str] = []
    for w in _words_to_numbers(words):
        if re.fullmatch(r"\d+", w):
            out.extend(w)
        else:
            out.append(w)
    return out
