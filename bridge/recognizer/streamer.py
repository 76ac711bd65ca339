"""Per-leg streaming recognizer: VAD endpointing, partials, finals, long-utterance commits.

The leg recognizer every engine gets today (`leg.LegRecognizer`): it turns any clip decoder
(`engines.Engine`, through the pool) into a streaming one by re-decoding the open utterance.
One instance per leg (direction of a call, channel of a stream). `feed()` is cheap and runs on
the event loop (VAD and bookkeeping only); decodes go through the shared RecognizerPool from
one task per leg, so finals come out in order and no partial can follow its final.

Latency design: an utterance ends after `endpointing_ms` of silence. Since that wait already
dominates final latency, the leg decodes the utterance speculatively as soon as a shorter
silence is seen; if no speech follows before the endpoint, that result *is* the final.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import structlog

from ..events.types import Final, Partial, Word
from .agreement import agreed_prefix, drop_seam_repeats, norm, norm_text, words_text
from .engines import SAMPLE_RATE, DecodeOptions, Hypothesis
from .pool import Priority, RecognizerPool, Superseded

log = structlog.get_logger(__name__)

ENDPOINTING_RANGE = (0, 20000)


@dataclass
class StreamerConfig:
    endpointing_ms: int = 700
    interim_results: bool = True
    language: str = "en"
    word_boost: tuple[str, ...] = ()
    partial_interval_s: float = 0.4  # new audio between partial re-decodes (grows with load)
    first_partial_s: float = 0.5  # speech needed before the first partial
    speculative_ms: int = 300  # silence after which the final is pre-decoded
    trailing_ms: int = 300  # silence kept after the last speech in a decode
    preroll_ms: int = 300  # audio kept before the first speech frame
    min_speech_ms: int = 200  # utterances with less speech are noise bursts
    max_utterance_s: float = 15.0  # commit agreed words of longer utterances
    min_piece_s: float = 4.0  # shortest piece: whisper needs context to transcribe well
    hard_max_utterance_s: float = 24.0  # commit even without agreement (whisper window is 30 s)
    window_limit_s: float = 28.0  # an utterance is ended here whatever happens (window is 30 s)
    min_gap_ms: int = 90  # a pause inside an utterance where a long one may be cut
    vad_kind: str = "default"
    vad_threshold: float = 0.5

    def validate(self) -> None:
        lo, hi = ENDPOINTING_RANGE
        if not isinstance(self.endpointing_ms, int) or not lo <= self.endpointing_ms <= hi:
            raise ValueError(f"endpointing_ms must be an integer in {lo}..{hi}")
        if not isinstance(self.word_boost, (tuple, list)) or not all(isinstance(w, str) for w in self.word_boost):
            raise ValueError("word_boost must be a list of strings")


@dataclass
class _Utterance:
    id: int
    start_sample: int  # stream position of buf[0]
    chunks: list[np.ndarray] = field(default_factory=list)
    n: int = 0
    speech_samples: int = 0
    last_speech_end: int = 0  # stream position just after the last speech frame
    silence_run: int = 0
    committed: list[Word] = field(default_factory=list)  # words already sent as non-speech_final finals
    prev_words: list[Word] | None = None  # last hypothesis, absolute times (LocalAgreement)
    last_partial_at: int = 0  # stream position at the last partial request
    speculated_for: int = -1  # last_speech_end the speculative decode covered
    gaps: list[tuple[int, int]] = field(default_factory=list)  # pauses inside speech (stream positions)

    def audio(self, end_sample: int | None = None) -> np.ndarray:
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        a = self.chunks[0] if self.chunks else np.zeros(0, np.int16)
        if end_sample is not None:
            a = a[: max(0, end_sample - self.start_sample)]
        return a

    def append(self, frame: np.ndarray) -> None:
        self.chunks.append(frame)
        self.n += len(frame)

    def cut(self, at_sample: int) -> None:
        """Drop audio before stream position `at_sample` (committed words)."""
        a = self.audio()
        k = max(0, min(len(a), at_sample - self.start_sample))
        self.chunks = [a[k:].copy()]
        self.n = len(self.chunks[0])
        self.start_sample += k

    @property
    def end_sample(self) -> int:
        return self.start_sample + self.n


@dataclass
class _FinalJob:
    utt: _Utterance
    end_sample: int
    speech_final: bool


@dataclass
class _Spec:
    utt_id: int
    start_sample: int
    last_speech_end: int
    hyp: Hypothesis


def _widest_first(gaps: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return sorted(gaps, key=lambda g: (g[1] - g[0], g[0]), reverse=True)


class StreamingRecognizer:
    """Turns one leg's 16 kHz PCM16 into Partial and Final events."""

    def __init__(
        self,
        pool: RecognizerPool,
        emit: Callable[[Any], None],
        *,
        channel: int = 0,
        speaker: str = "ch0",
        config: StreamerConfig | None = None,
        vad: Any = None,
        logger: Any = None,
    ) -> None:
        self.pool = pool
        self.emit = emit
        self.channel = channel
        self.speaker = speaker
        self.config = config or StreamerConfig()
        self.config.validate()
        if vad is None:
            from .vad import make_vad

            vad = make_vad() if self.config.vad_kind == "default" else make_vad(self.config.vad_kind)
        self.vad = vad
        self.log = logger or log.bind(channel=channel, speaker=speaker)
        self.samples_in = 0
        self.detected_language: str | None = None
        self._vad_left = np.zeros(0, np.int16)
        self._preroll: collections.deque[np.ndarray] = collections.deque()
        self._preroll_n = 0
        self._utt: _Utterance | None = None
        self._utt_seq = 0
        self._finals: collections.deque[_FinalJob] = collections.deque()
        self._spec: _Spec | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self.stats = {"finals": 0, "partials": 0, "dropped_hallucinations": 0, "noise_bursts": 0,
                      "speculative_hits": 0, "pieces": 0, "forced_cuts": 0, "window_endpoints": 0}

    # -- control -------------------------------------------------------------------------------
    def start(self) -> asyncio.Task:
        """Start the leg's decoding task (once); it ends after `finish`, or with the leg's failure."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"leg-{self.channel}")
        return self._task

    def configure(self, endpointing_ms: int | None = None, **_: Any) -> None:
        """Change endpointing while the leg runs; applies to the open utterance at once."""
        if endpointing_ms is not None:
            self.config = replace(self.config, endpointing_ms=endpointing_ms)
            self.config.validate()
            self._check_endpoint()

    def force_endpoint(self) -> None:
        """End the open utterance now: its final follows as soon as it is decoded."""
        if self._utt is not None:
            self._endpoint(speech_final=True)

    async def finish(self) -> None:
        """Flush: end any open utterance, wait for every final, stop the leg's task."""
        self._closing = True
        if len(self._vad_left):
            pad = np.zeros(self.vad.frame_samples - len(self._vad_left), np.int16)
            self._process_frame(np.concatenate([self._vad_left, pad])[: self.vad.frame_samples], real=len(self._vad_left))
            self._vad_left = np.zeros(0, np.int16)
        if self._utt is not None:
            self._endpoint(speech_final=True)
        self._wake.set()
        if self._task is not None:
            await self._task

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @property
    def stream_seconds(self) -> float:
        return self.samples_in / SAMPLE_RATE

    # -- audio in ------------------------------------------------------------------------------
    def feed(self, pcm: np.ndarray) -> None:
        """Take 16 kHz int16 mono audio of any length."""
        if self._closing:
            raise RuntimeError("leg is finished")
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"feed takes 1-D int16 audio, got {pcm.dtype} {pcm.shape}")
        # own the samples: frames are kept in the utterance buffer and the caller may reuse its array
        pcm = np.concatenate([self._vad_left, pcm]) if len(self._vad_left) else pcm.copy()
        fs = self.vad.frame_samples
        n_full = len(pcm) // fs * fs
        for i in range(0, n_full, fs):
            self._process_frame(pcm[i : i + fs])
        self._vad_left = pcm[n_full:].copy()
        self._wake.set()

    def _process_frame(self, frame: np.ndarray, real: int | None = None) -> None:
        n = len(frame) if real is None else real
        speech = self.vad.speech_prob(frame) >= self.config.vad_threshold
        frame = frame[:n]
        self.samples_in += n
        u = self._utt
        if u is None:
            self._preroll.append(frame)
            self._preroll_n += n
            limit = self.config.preroll_ms * SAMPLE_RATE // 1000
            while self._preroll_n - len(self._preroll[0]) >= limit:
                self._preroll_n -= len(self._preroll.popleft())
            if not speech:
                return
            self._utt_seq += 1
            u = self._utt = _Utterance(id=self._utt_seq, start_sample=self.samples_in - self._preroll_n)
            for c in self._preroll:
                u.append(c)
            self._preroll.clear()
            self._preroll_n = 0
            u.speech_samples = n
            u.last_speech_end = self.samples_in
            u.last_partial_at = u.start_sample
            return
        u.append(frame)
        if speech:
            if u.silence_run >= self.config.min_gap_ms * SAMPLE_RATE // 1000:
                u.gaps.append((self.samples_in - n - u.silence_run, self.samples_in - n))
            u.speech_samples += n
            u.last_speech_end = self.samples_in
            u.silence_run = 0
        else:
            u.silence_run += n
        if u.n >= self.config.window_limit_s * SAMPLE_RATE:
            # Pieces could not be committed in time (overload starved the partial decodes):
            # end the utterance before it outgrows whisper's window rather than lose audio.
            self.stats["window_endpoints"] += 1
            self._endpoint(speech_final=False)
            return
        self._check_endpoint()

    def _check_endpoint(self) -> None:
        u = self._utt
        if u is None:
            return
        if u.silence_run >= self.config.endpointing_ms * SAMPLE_RATE // 1000 and u.silence_run > 0:
            self._endpoint(speech_final=True)

    def _endpoint(self, speech_final: bool) -> None:
        u = self._utt
        assert u is not None
        self._utt = None
        if u.speech_samples < self.config.min_speech_ms * SAMPLE_RATE // 1000 and not u.committed:
            self.stats["noise_bursts"] += 1
            return
        end = self._decode_end(u)
        self._finals.append(_FinalJob(u, end, speech_final))
        self._wake.set()

    def _decode_end(self, u: _Utterance) -> int:
        """Where a final's audio ends: the last speech plus a little of the silence after it."""
        return min(u.end_sample, u.last_speech_end + self.config.trailing_ms * SAMPLE_RATE // 1000)

    # -- decoding task -------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._finals:
                    await self._do_final(self._finals.popleft())
                if self._closing:
                    if not self._finals:
                        return
                    continue
                if self._want_speculative():
                    await self._do_speculative()
                    self._wake.set()
                elif self._want_partial():
                    await self._do_partial()
                    self._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("leg_recognizer_failed")
            raise

    def _opts(self, partial: bool, prompt_words: list[Word] | None = None) -> DecodeOptions:
        lang = self.config.language
        if lang == "auto" and partial and self.detected_language:
            lang = self.detected_language
        prompt = ""
        if self.config.word_boost:
            prompt = ", ".join(self.config.word_boost) + "."
        if prompt_words:
            prompt = (prompt + " " + words_text(prompt_words[-40:])).strip()
        return DecodeOptions(language=lang, prompt=prompt, partial=partial)

    def _want_speculative(self) -> bool:
        u = self._utt
        if u is None or self.config.speculative_ms >= self.config.endpointing_ms:
            return False
        return (
            u.silence_run >= self.config.speculative_ms * SAMPLE_RATE // 1000
            and u.speculated_for != u.last_speech_end
            and u.speech_samples >= self.config.min_speech_ms * SAMPLE_RATE // 1000
        )

    async def _do_speculative(self) -> None:
        u = self._utt
        assert u is not None
        u.speculated_for = u.last_speech_end
        start, lse, uid = u.start_sample, u.last_speech_end, u.id
        end = self._decode_end(u)
        hyp = await self.pool.decode(u.audio(end), self._opts(False, u.committed), Priority.FINAL)
        self._spec = _Spec(uid, start, lse, hyp)

    def _want_partial(self) -> bool:
        u = self._utt
        if u is None:
            return False
        long_utt = u.n >= (self.config.max_utterance_s - 2.0) * SAMPLE_RATE
        if not (self.config.interim_results or long_utt):
            return False
        if u.speech_samples < self.config.first_partial_s * SAMPLE_RATE and not long_utt:
            return False
        interval = self.config.partial_interval_s * (1.0 + max(0.0, self.pool.load() - 1.0))
        return u.end_sample - u.last_partial_at >= interval * SAMPLE_RATE

    async def _do_partial(self) -> None:
        u = self._utt
        assert u is not None
        u.last_partial_at = u.end_sample
        uid, start = u.id, u.start_sample
        audio = u.audio()
        try:
            hyp = await self.pool.decode(audio, self._opts(True, u.committed), Priority.PARTIAL, key=id(self))
        except Superseded:
            return
        if self._utt is not u or u.start_sample != start or u.id != uid:
            return  # endpointed or cut meanwhile: a partial must never follow its final
        words = self._absolute(hyp.words, start)
        words = drop_seam_repeats(u.committed, words, start / SAMPLE_RATE)
        if self._rejected(hyp, u.speech_samples):
            words = []
        prev, u.prev_words = u.prev_words, words
        if self.config.interim_results and words:
            self.stats["partials"] += 1
            self.emit(Partial(words_text(words), self.channel, self.speaker, start / SAMPLE_RATE,
                              u.end_sample / SAMPLE_RATE))
        if u.n >= self.config.max_utterance_s * SAMPLE_RATE:
            await self._commit_piece(u, prev, words)

    async def _commit_piece(self, u: _Utterance, prev: list[Word] | None, words: list[Word]) -> None:
        """Commit the stable head of a long utterance as a final with speech_final false.

        LocalAgreement decides *what* is stable: the prefix two consecutive hypotheses agree on.
        The cut goes into a VAD pause inside that prefix, and the piece is re-decoded on its own
        at final quality, so no word straddles the seam (whisper's word times are too coarse to
        cut between words safely) and a skip in a long partial decode cannot lose words.
        """
        sr = SAMPLE_RATE
        k = agreed_prefix(prev, words) if prev is not None else 0
        k = min(k, max(0, len(words) - 1))  # the newest word may still be forming
        min_piece = u.start_sample + int(self.config.min_piece_s * sr)
        cut = None
        if k:
            stable_until = int(words[k - 1].end * sr)
            cut = self._widest_gap(u, min_piece, stable_until)
        if cut is None and prev is not None:
            cut = self._agreed_seam(u, prev, words, min_piece, u.end_sample - sr)
        if cut is None and u.n >= self.config.hard_max_utterance_s * sr:
            # No agreement or no pause in it: take any pause, else cut between agreed words.
            cut = self._widest_gap(u, min_piece, u.end_sample - sr)
            if cut is None and k:
                nxt = words[k].start if k < len(words) else words[k - 1].end
                cut = int((words[k - 1].end + max(words[k - 1].end, nxt)) / 2 * sr)
            if cut is None:
                cut = u.end_sample - 2 * sr
            self.stats["forced_cuts"] += 1
        if cut is None:
            return
        hyp = await self.pool.decode(u.audio(cut), self._opts(False, u.committed), Priority.FINAL)
        piece = drop_seam_repeats(u.committed, self._absolute(hyp.words, u.start_sample), u.start_sample / sr)
        if piece and not self._rejected(hyp, u.speech_samples):
            self._emit_final(piece, speech_final=False, hyp=hyp)
            u.committed.extend(piece)
        u.cut(cut)
        u.gaps = [g for g in u.gaps if g[0] >= cut]
        u.prev_words = None
        u.last_partial_at = u.start_sample
        self.stats["pieces"] += 1

    @staticmethod
    def _agreed_seam(u: _Utterance, prev: list[Word], cur: list[Word], lo: int, hi: int) -> int | None:
        """The latest pause where both hypotheses agree on the words on either side of it.

        Whisper often rewrites the first words of a long buffer on every decode, which stalls a
        pure prefix agreement; what a clean cut needs is only that the seam is stable.
        """

        def around(words: list[Word], c: float) -> tuple[str, ...] | None:
            before = [norm(w.word) for w in words if (w.start + w.end) / 2 < c]
            after = [norm(w.word) for w in words if (w.start + w.end) / 2 >= c]
            if len(before) < 2 or not after:
                return None
            return (*before[-2:], after[0])

        for g0, g1 in _widest_first(u.gaps):
            c = (g0 + g1) // 2
            if not lo <= c <= hi:
                continue
            a, b = around(prev, c / SAMPLE_RATE), around(cur, c / SAMPLE_RATE)
            if a is not None and a == b:
                return c
        return None

    @staticmethod
    def _widest_gap(u: _Utterance, lo: int, hi: int) -> int | None:
        """Centre of the widest pause with its centre in [lo, hi] (latest on ties).

        The widest pause is most likely a sentence boundary: a piece that ends there keeps its
        sentence whole, which whisper transcribes better than a clause cut at a breath.
        """
        for g0, g1 in _widest_first(u.gaps):
            c = (g0 + g1) // 2
            if lo <= c <= hi:
                return c
        return None

    async def _do_final(self, job: _FinalJob) -> None:
        u = job.utt
        spec = self._spec
        self._spec = None
        if spec and spec.utt_id == u.id and spec.start_sample == u.start_sample and spec.last_speech_end == u.last_speech_end:
            hyp = spec.hyp
            self.stats["speculative_hits"] += 1
        else:
            hyp = await self.pool.decode(u.audio(job.end_sample), self._opts(False, u.committed), Priority.FINAL)
        if self.config.language == "auto" and hyp.language:
            self.detected_language = hyp.language
        words = self._absolute(hyp.words, u.start_sample)
        words = drop_seam_repeats(u.committed, words, u.start_sample / SAMPLE_RATE)
        if self._rejected(hyp, u.speech_samples):
            self.stats["dropped_hallucinations"] += 1
            self.log.info("final_rejected", text=hyp.text, **hyp.signals(),
                          speech_ms=u.speech_samples * 1000 // SAMPLE_RATE)
            words = []
        if words:
            self._emit_final(words, job.speech_final, hyp)
        elif u.committed and job.speech_final:
            # The utterance's pieces went out with speech_final false and its tail held no words:
            # an empty final still tells clients the speaker paused (as hosted APIs do).
            t = min(u.last_speech_end, job.end_sample) / SAMPLE_RATE
            self.stats["finals"] += 1
            self.emit(Final("", (), self.channel, self.speaker, t, t, True, language=hyp.language))

    def _emit_final(self, words: list[Word], speech_final: bool, hyp: Hypothesis) -> None:
        self.stats["finals"] += 1
        conf = float(np.mean([w.confidence for w in words])) if words else None
        self.emit(Final(words_text(words), tuple(words), self.channel, self.speaker, words[0].start,
                        words[-1].end, speech_final, language=hyp.language, confidence=conf))

    # -- helpers -------------------------------------------------------------------------------
    def _absolute(self, words: list[Word], start_sample: int) -> list[Word]:
        off = start_sample / SAMPLE_RATE
        return [Word(w.word, w.start + off, w.end + off, w.confidence) for w in words if norm(w.word) or w.word.strip()]

    def _rejected(self, hyp: Hypothesis, speech_samples: int) -> bool:
        """No text, or text the engine's own filter says it invented (whisper: on noise)."""
        if not norm_text(hyp.text):
            return True
        return self.pool.hypothesis_filter.rejects(hyp, speech_samples / SAMPLE_RATE)
