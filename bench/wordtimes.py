"""When each word of a generated sentence really starts, from espeak-ng itself.

Partial lag needs "when was the word spoken". The recognizer's own word times are whisper's
timestamps (~0.1 s coarse, and they are the thing being measured), so the benchmarks also score
against the synthesizer's truth: libespeak-ng reports a WORD event with the audio position (ms)
where each word starts; bench.calls derives where each word ends from the audio. The library
renders what `espeak-ng -v VOICE -s RATE` renders for bench.corpus.synthesize, and the audio is
checked against the cached file sample for sample, so the times apply to the audio the
benchmarks play.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from . import corpus

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE = 1  # espeakRATE
_EVENT_LIST_TERMINATED, _EVENT_WORD = 0, 1


class _Event(ctypes.Structure):  # espeak_EVENT, speak_lib.h
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_void_p)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


def _lib_synth(text: str, voice: str, rate: int) -> tuple[np.ndarray, int, list[tuple[int, int, int]]]:
    """Synthesize once in this process with libespeak-ng (which must not have been used here
    before: it carries filter and prosody state from one sentence into the next, and neither
    re-initialising nor espeak_Terminate resets it; the second hangs)."""
    lib = ctypes.CDLL(ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1")
    sr = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0)
    if sr <= 0:
        raise RuntimeError(f"espeak_Initialize failed ({sr})")
    chunks: list[np.ndarray] = []
    words: list[tuple[int, int, int]] = []

    def on_audio(wav, n, events):
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_WORD:
                words.append((ev.text_position - 1, ev.length, ev.audio_position))
            i += 1
        return 0

    cb = _CALLBACK(on_audio)
    data = text.encode("utf-8")
    lib.espeak_SetSynthCallback(cb)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"espeak-ng has no voice {voice!r}")
    lib.espeak_SetParameter(_RATE, int(rate), 0)
    err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    lib.espeak_Synchronize()
    if err != 0:
        raise RuntimeError(f"espeak_Synth failed ({err})")
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return audio, sr, words


def _synth_with_words(text: str, voice: str, rate: int) -> tuple[np.ndarray, int, list[tuple[int, int, int]]]:
    """(raw int16 audio at the synthesizer's rate, that rate, [(char start, char length, ms)]),
    from a fresh process per sentence, as the espeak-ng CLI renders each one fresh."""
    proc = subprocess.run([sys.executable, "-m", "bench.wordtimes", voice, str(int(rate))], input=text.encode("utf-8"),
                          capture_output=True, check=False, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"libespeak-ng failed for {text!r}: {proc.stderr.decode(errors='replace').strip()}")
    head, _, audio = proc.stdout.partition(b"\n")
    meta = json.loads(head)
    return np.frombuffer(audio, np.int16), meta["rate"], [tuple(w) for w in meta["words"]]


def word_starts(text: str, voice: str = "en-us", rate: int = 160) -> tuple[list[tuple[str, float]], float]:
    """([(word as written, start in seconds)], seconds of audio before the CLI's trailing
    silence) as libespeak-ng renders ``text``; checked against corpus.synthesize's audio,
    sample for sample, so the times apply to it."""
    raw, sr, events = _synth_with_words(text, voice, rate)
    seconds = len(raw) / sr
    # The CLI renders the same samples and then some trailing silence; compare at 16 kHz, short
    # of the resampler's edge at the end.
    mine = corpus._resample(raw, sr, corpus.SAMPLE_RATE)[:-200]
    cached = corpus.synthesize(text, voice, rate)
    if len(cached) < len(mine) or np.max(np.abs(cached[:len(mine)].astype(np.int32) - mine)) > 2:
        raise RuntimeError(f"libespeak-ng's audio for {text!r} ({voice}, {rate}) differs from the CLI's: "
                           "the word times would not fit the audio")
    words = [(text[pos:pos + length], ms / 1000) for pos, length, ms in events]
    return [(w, t) for w, t in words if w.strip()], seconds  # espeak sends some empty WORD events


if __name__ == "__main__":  # one sentence from stdin: a JSON line (rate, words), then the raw audio
    _audio, _sr, _words = _lib_synth(sys.stdin.read(), sys.argv[1], int(sys.argv[2]))
    sys.stdout.buffer.write(json.dumps({"rate": _sr, "words": _words}).encode() + b"\n" + _audio.astype("<i2").tobytes())
