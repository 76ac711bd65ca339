"""The whisper.cpp engine (via pywhispercpp): one context and how we call it for streaming.

The costs that shape this module (measured in docs/benchmarks.md; see docs/recognizer.md):
whisper.cpp pads every decode to a 30 s window unless `audio_ctx` is lowered, so we size the
encoder context to the audio plus a margin (small for partials, larger for finals); a reduced
context can make the decoder loop on short audio, so tokens are capped per second of audio and
repetition is detected. `whisper_full` releases the GIL, so a pool of contexts decodes in
parallel threads. What whisper invents on noise, and how it is caught, is `WhisperFilter`.

Flash attention is off: in whisper.cpp 1.8.5 it attends over the encoder context rounded up to
256 positions with no mask, and the positions past `audio_ctx` hold whatever the context's
previous decode left there, so the same audio gave different text depending on history
(docs/recognizer.md). Without it a decode depends on its audio and options alone (for
language "auto" only once `_set_audio_ctx` works around a second such leak).
"""

from __future__ import annotations

import math
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...events.types import Word
from ..agreement import norm_text
from .base import SAMPLE_RATE, DecodeOptions, Hypothesis, ModelLoadError

NAME = "whisper.cpp"
MEL_FRAMES_PER_S = 50  # encoder positions per second of audio (whisper: 1500 per 30 s)
MAX_AUDIO_S = 30.0
PARTIAL_CTX_MARGIN = 64  # encoder positions past the audio (0.02 s each): speed for partials,
# A context allocates its buffers for the full 30 s window when it loads, and keeps resident what
# its largest decode touched (tiny.en: 91 MB after 2 s decodes, 109 MB after 10 s, 191 MB after a
# full window; python -m bench.memory --context). A context whose largest decode since it loaded
# went past this many encoder positions (10 s) asks to be reloaded when the service goes idle
# (`holds_scratch`; RecognizerPool.release_scratch), so each retry over the full window does not
# keep ~100 MB for good. The binding has no call that frees only those buffers.
RELOAD_ABOVE_CTX = 564
FULL_CTX = 1500  # encoder positions of whisper's 30 s window
FINAL_CTX_MARGIN = 256  # accuracy for finals (36 clips: 17.7 % WER at 64, 10.8 % at 256, 9.4 % at 1500)


@dataclass(frozen=True)
class WhisperDecodeOptions(DecodeOptions):
    """whisper.cpp's own knobs, for benches and tests that probe them; the streamer never sets them."""

    ctx_margin: int | None = None  # None: PARTIAL_CTX_MARGIN or FINAL_CTX_MARGIN by `partial`
    min_ctx: int = 0  # a floor for very short audio


@dataclass(kw_only=True)
class WhisperHypothesis(Hypothesis):
    """A whisper decode, with the signals whisper's own rules use to reject a failed one."""

    avg_logprob: float
    compression_ratio: float
    n_tokens: int
    looped: bool = False
    token_probs: list[float] = field(default_factory=list)

    @property
    def confidence(self) -> float:
        return float(np.mean(self.token_probs)) if self.token_probs else 0.0

    def signals(self) -> dict[str, float]:
        return {"avg_logprob": round(self.avg_logprob, 2), "compression": round(self.compression_ratio, 2)}


# Phrases whisper invents on noise and silence (trained on subtitles). Dropped only when the
# decode is unsure and stands on more speech than such a phrase takes (STOCK_PHRASE_MAX_S):
# callers do say "thank you", and a real "Bye." or "Okay." is short (0.3-0.6 s) and decoded
# with a mean token probability of only 0.4-0.6 by tiny.en (tests/test_recognizer.py).
HALLUCINATIONS = frozenset({
    "thank you", "thanks for watching", "thank you for watching", "thank you very much", "you",
    "bye", "okay", "so", "uh", "um", "hmm", "oh", "the end", "please subscribe",
    "subtitles by the amaraorg community", "thanks for listening", "i", "a", "and",
})
# A stock phrase decoded from this much VAD speech or more did not come from the speech: whisper
# heard something it could not transcribe and filled in a subtitle phrase.
STOCK_PHRASE_MAX_S = 1.5


@dataclass(frozen=True)
class WhisperFilter:
    """Whisper's own tests for a failed decode, plus its known phrases on near-silence."""

    min_avg_logprob: float = -1.0  # for short speech, where invented text is likely
    min_avg_logprob_long: float = -1.5  # for >= 1.5 s of VAD speech: unsure text beats none
    max_compression_ratio: float = 2.4
    stock_phrases: frozenset[str] = HALLUCINATIONS

    def rejects(self, hyp: Hypothesis, speech_s: float) -> bool:
        if not isinstance(hyp, WhisperHypothesis):
            raise TypeError(f"WhisperFilter judges whisper hypotheses, got {type(hyp).__name__}")
        if hyp.looped or hyp.compression_ratio > self.max_compression_ratio:
            return True
        floor = self.min_avg_logprob if speech_s < 1.5 else self.min_avg_logprob_long
        if hyp.avg_logprob < floor:
            return True
        # Short speech is judged by the log-probability floor above, like any other short reply;
        # the old "or shorter than 0.5 s" and "unsure" alone dropped every real "Bye." and "Okay.".
        text = norm_text(hyp.text)
        return text in self.stock_phrases and hyp.confidence < 0.7 and speech_s >= STOCK_PHRASE_MAX_S


_REPEAT = re.compile(r"(\b.+?\b)(?:\W+\1\b){3,}", re.IGNORECASE)


def looks_looped(text: str) -> bool:
    """The decoder repeating a phrase 4+ times in a row: whisper's failure mode on short context."""
    return bool(_REPEAT.search(text))


def implausible_tokens(audio_s: float) -> int:
    """More text tokens than anyone speaks in that time (fast speech is ~5 tokens/s)."""
    return int(12 + 10 * audio_s)


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


_PRIME_AUDIO = np.zeros(SAMPLE_RATE // 5, np.float32)


def _stop(*_: object) -> bool:
    return False  # encoder-begin callback: end whisper_full before it encodes anything


def whisper_languages() -> frozenset[str]:
    """Every language code whisper.cpp knows (the binding's table; no model needed)."""
    import _pywhispercpp as pw  # the native binding loads only when an engine is used

    return frozenset(pw.whisper_lang_str(i) for i in range(pw.whisper_lang_max_id() + 1))


class WhisperEngine:
    """A whisper.cpp context; not thread-safe: the pool gives each to one thread at a time."""

    name = NAME
    sample_rate = SAMPLE_RATE

    def __init__(self, model_path: str | Path, n_threads: int = 1, flash_attn: bool = False,
                 hypothesis_filter: WhisperFilter | None = None) -> None:
        import _pywhispercpp as pw  # the native binding loads only when an engine is used
        from pywhispercpp.model import Model

        self._pw = pw
        self.hypothesis_filter = hypothesis_filter or WhisperFilter()
        self.languages = whisper_languages()
        self.model_path = str(model_path)
        self.n_threads = n_threads
        try:
            self._model = Model(
                self.model_path,
                n_threads=n_threads,
                print_progress=False,
                print_realtime=False,
                print_timestamps=False,
                redirect_whispercpp_logs_to=None,
                context_params={"flash_attn": flash_attn},  # off: see the module docstring
            )
        except Exception as e:  # pywhispercpp raises bare RuntimeError/Exception
            raise ModelLoadError(f"whisper.cpp could not load {self.model_path}: {e}") from e
        self._ctx = self._model._ctx
        if self._ctx is None:
            raise ModelLoadError(f"whisper.cpp could not load {self.model_path}")
        self._params = self._model._params
        self.multilingual = bool(pw.whisper_is_multilingual(self._ctx))
        self.eot = pw.whisper_token_eot(self._ctx)
        self._lock = threading.Lock()
        self.peak_ctx = 0  # the largest encoder context a decode used since this context loaded
        p = self._params
        p.no_context = True
        p.suppress_blank = True
        p.suppress_nst = True  # no "[Music]", "(applause)" tokens
        p.token_timestamps = True
        p.single_segment = False
        p.no_timestamps = False
        p.thold_pt = 0.01
        p.max_initial_ts = 1.0

    @classmethod
    def load(cls, model_path: str, *, threads: int) -> "WhisperEngine":
        """The registry's loader (bridge/recognizer/engines/__init__.py)."""
        return cls(model_path, n_threads=threads)

    def audio_ctx_for(self, n_samples: int, opts: DecodeOptions) -> int:
        if opts.offline:
            return 0
        margin, floor = (opts.ctx_margin, opts.min_ctx) if isinstance(opts, WhisperDecodeOptions) else (None, 0)
        if margin is None:
            margin = PARTIAL_CTX_MARGIN if opts.partial else FINAL_CTX_MARGIN
        need = math.ceil(n_samples / SAMPLE_RATE * MEL_FRAMES_PER_S) + margin
        return int(min(1500, max(need, floor)))

    def decode(self, audio: np.ndarray, opts: DecodeOptions) -> WhisperHypothesis:
        """Decode float32 16 kHz mono audio (at most 30 s) into text and timed words."""
        if audio.ndim != 1:
            raise ValueError(f"decode takes mono audio, got shape {audio.shape}")
        if audio.dtype != np.float32:
            audio = (audio.astype(np.float32) / 32768.0) if audio.dtype == np.int16 else audio.astype(np.float32)
        if not opts.offline:  # streaming decodes are one window; offline ones may seek through many
            audio = audio[: int(MAX_AUDIO_S * SAMPLE_RATE)]
        audio = np.ascontiguousarray(audio)
        audio_s = len(audio) / SAMPLE_RATE
        lang = opts.language or "en"
        if not self.multilingual:
            lang = "en"
        if not audio.size:
            # whisper_full on no samples returns 0 and leaves the previous decode's segments in
            # the context: the last caller's text came back (tests/test_engine_contract.py).
            return WhisperHypothesis(text="", words=[], language=None if lang == "auto" else lang, audio_s=0.0,
                                     decode_s=0.0, avg_logprob=0.0, compression_ratio=0.0, n_tokens=0)
        with self._lock:
            p = self._params
            p.audio_ctx = self.audio_ctx_for(len(audio), opts)
            p.language = lang
            p.detect_language = False
            p.initial_prompt = opts.prompt or ""
            p.n_max_text_ctx = 64 if opts.partial else 128
            p.temperature = 0.0
            # Temperature fallback re-decodes up to 5 times: measured 2-6 s on a looping short
            # clip. We detect loops ourselves and retry once over the full window instead.
            p.temperature_inc = 0.0
            detect = lang == "auto"  # (not read back from p: it returns "auto" as "")
            used = p.audio_ctx or FULL_CTX
            hyp = self._run(audio, audio_s, detect)
            if (hyp.looped or hyp.n_tokens > implausible_tokens(audio_s)) and p.audio_ctx:
                p.audio_ctx = 0
                retry = self._run(audio, audio_s, detect)
                retry.decode_s += hyp.decode_s
                retry.retried = True
                hyp, used = retry, FULL_CTX
            self.peak_ctx = max(self.peak_ctx, used)
            return hyp

    def holds_scratch(self) -> bool:
        """A decode past 10 s of context left buffers resident that only a reload gives back."""
        return self.peak_ctx > RELOAD_ABOVE_CTX

    def _run(self, audio: np.ndarray, audio_s: float, detect: bool) -> WhisperHypothesis:
        t0 = time.perf_counter()
        if detect:
            self._set_audio_ctx()
        rc = self._pw.whisper_full(self._ctx, self._params, audio, audio.size)
        decode_s = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"whisper_full failed with code {rc}")
        return self._collect(audio_s, decode_s)

    def _set_audio_ctx(self) -> None:
        """Make the context's encoder size the one this decode asked for, before it detects the
        language. whisper.cpp 1.8.5 detects the language before it applies `audio_ctx`, with the
        size the previous decode left: after a short partial it heard only that partial's first
        seconds (a Spanish final came out as Latin). A whisper_full with a fixed language sets the
        size; stopped at its encoder-begin callback, it costs a mel of 0.2 s of silence (~4 ms)."""
        pw, p = self._pw, self._params
        p.language = "en"
        pw.assign_encoder_begin_callback(p, _stop)
        try:
            pw.whisper_full(self._ctx, p, _PRIME_AUDIO, _PRIME_AUDIO.size)
        finally:
            pw.clear_encoder_begin_callback(p)
            p.language = "auto"

    def _collect(self, audio_s: float, decode_s: float) -> WhisperHypothesis:
        pw, ctx = self._pw, self._ctx
        words: list[Word] = []
        texts: list[str] = []
        probs: list[float] = []
        logps: list[float] = []
        cur: list = []  # [bytes, t0, t1, [p...]]

        def close_word() -> None:
            if cur and cur[0].strip():
                w = cur[0].decode("utf-8", "replace").strip()
                words.append(Word(w, cur[1] / 100.0, max(cur[2], cur[1]) / 100.0, float(np.mean(cur[3]))))

        n_seg = pw.whisper_full_n_segments(ctx)
        for i in range(n_seg):
            texts.append(pw.whisper_full_get_segment_text(ctx, i).decode("utf-8", "replace"))
            for j in range(pw.whisper_full_n_tokens(ctx, i)):
                d = pw.whisper_full_get_token_data(ctx, i, j)
                if d.id >= self.eot:
                    continue
                raw = pw.whisper_token_to_bytes(ctx, d.id)
                if isinstance(raw, str):
                    raw = raw.encode("utf-8")
                probs.append(float(d.p))
                logps.append(float(d.plog))
                t0, t1 = int(d.t0), int(d.t1)
                if raw.startswith(b" ") or not cur:
                    close_word()
                    cur = [raw, t0, t1, [float(d.p)]]
                else:
                    cur[0] += raw
                    cur[2] = max(cur[2], t1)
                    cur[3].append(float(d.p))
        close_word()
        text = " ".join(t.strip() for t in texts if t.strip())
        lang_id = pw.whisper_full_lang_id(ctx)
        language = pw.whisper_lang_str(lang_id) if lang_id >= 0 else None
        # clamp word times into the audio (whisper's timestamp tokens can overshoot)
        words = [Word(w.word, min(w.start, audio_s), min(max(w.end, w.start), audio_s), w.confidence) for w in words]
        return WhisperHypothesis(
            text=text,
            words=words,
            language=language,
            avg_logprob=float(np.mean(logps)) if logps else 0.0,
            compression_ratio=compression_ratio(text),
            n_tokens=len(probs),
            audio_s=audio_s,
            decode_s=decode_s,
            looped=looks_looped(text),
            token_probs=probs,
        )
