"""The process-wide scheduler: a few engine instances (whisper.cpp contexts) shared by every leg.

A whisper context costs ~100 MB (tiny) and a decode saturates its threads, so legs do not get
their own: they queue here. Finals go before partials (a final is what users keep; a partial is
superseded within a second anyway); each leg has at most one partial waiting, a newer one
replaces it, and partials that waited too long are dropped. Finals are never dropped.
Decodes run in worker threads (whisper_full releases the GIL), off the event loop. The pool
knows engines only through `engines.Engine`; which one it loads is a registry name.

The pool also knows how fast it decodes: at start each context decodes a calibration clip, and
from then on finals measure it (decode seconds per second of audio over the recent window).
Admission (bridge/admission.py) sizes the leg cap from that figure, so a slower or busier box
admits fewer legs instead of letting every call fall late.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import threading
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Callable, Hashable

import numpy as np
import structlog

from .engines import DEFAULT_ENGINE, SAMPLE_RATE, DecodeOptions, Engine, Hypothesis, HypothesisFilter, load_engine

log = structlog.get_logger(__name__)


class Priority(IntEnum):
    FINAL = 0
    PARTIAL = 1


class Superseded(Exception):
    """A queued partial was replaced by a newer one of the same leg, or went stale."""


class Histogram:
    """Cumulative-bucket histogram in the Prometheus style (seconds)."""

    BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0
        self._recent: list[float] = []

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.BUCKETS, v)] += 1
        self.sum += v
        self.count += 1
        self._recent.append(v)
        if len(self._recent) > 2048:
            del self._recent[:1024]

    def quantile(self, q: float) -> float:
        return float(np.quantile(self._recent, q)) if self._recent else 0.0

    def snapshot(self) -> dict[str, Any]:
        cum, out = 0, {}
        for b, c in zip(self.BUCKETS + (float("inf"),), self.counts):
            cum += c
            out[str(b)] = cum
        return {"buckets": out, "sum": self.sum, "count": self.count,
                "p50": self.quantile(0.5), "p95": self.quantile(0.95)}


# The calibration clip: a final decode (the engine's accurate path) of 4 s of audio, about one
# sentence, over quiet noise, which whisper turns into no text, so the figure is the encoder's
# cost and nothing depends on what a test voice says.
CALIBRATION_AUDIO_S = 4.0
CALIBRATION_OPTIONS = DecodeOptions(partial=False)
# Finals' own speed replaces the calibration once the window holds this much decoded audio.
SPEED_EVIDENCE_AUDIO_S = 10.0


def calibration_clip() -> np.ndarray:
    return (np.random.default_rng(7).standard_normal(int(CALIBRATION_AUDIO_S * 16000)) * 0.003).astype(np.float32)


@dataclass(frozen=True)
class FinalTiming:
    """How the pool has been serving finals lately: what admission (bridge/admission.py) reads."""

    window_s: float
    finals: int  # finals decoded in the window
    latency_p95_s: float | None  # p95 of queue wait + decode over those finals; None without any
    oldest_waiting_s: float  # age of the oldest final still queued (0 when none): lateness not yet observed
    utilization: float  # share of the contexts' time spent decoding finals in the window
    decode_s_per_audio_s: float | None  # what a second of final audio costs one context; None before start
    speed_source: str  # "finals" (measured over the window) or "calibration" (too few finals yet)


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    audio: np.ndarray = field(compare=False)
    opts: DecodeOptions = field(compare=False)
    future: asyncio.Future = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)
    key: Hashable | None = field(compare=False, default=None)
    enqueued: float = field(compare=False, default=0.0)
    cancelled: bool = field(compare=False, default=False)


class RecognizerPool:
    """Shared decode pool. `size` engine instances of the registered engine `engine`, each
    decoding with `threads` threads (`engine_factory`, if given, builds them instead)."""

    def __init__(
        self,
        model_path: str | Path,
        size: int | None = None,
        threads: int = 1,
        partial_max_wait_s: float = 1.0,
        engine_factory: Callable[[], Engine] | None = None,
        engine: str = DEFAULT_ENGINE,
    ) -> None:
        self.model_path = str(model_path)
        self.size = size or os.cpu_count() or 1
        self.threads = threads
        self.partial_max_wait_s = partial_max_wait_s
        self.engine = engine
        self._factory = engine_factory or (lambda: load_engine(engine, self.model_path, threads=self.threads))
        self._heap: list[_Job] = []
        self._pending_partial: dict[Hashable, _Job] = {}
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.busy = 0
        self.decode_hist = {p: Histogram() for p in Priority}
        self.wait_hist = {p: Histogram() for p in Priority}
        self.completed = {p: 0 for p in Priority}
        self.superseded = 0
        self.retried = 0
        self.engines: list[Engine] = []
        # (done, wait + decode, decode, audio) of recent finals; bounded so a busy pool cannot grow it
        self._recent_finals: deque[tuple[float, float, float, float]] = deque(maxlen=4096)
        self.reloads = 0  # contexts reloaded by release_scratch
        self.calibrated_speed: float | None = None  # decode s per audio s of the calibration clip
        self._speed: float | None = None  # the latest figure: finals over a window, else calibration
        self._started_at = time.monotonic()

    def start(self) -> None:
        """Load the contexts (blocking: seconds) and start the workers."""
        if self._threads:
            return
        self.engines = [self._factory() for _ in range(self.size)]
        rates = {e.sample_rate for e in self.engines}
        if rates != {SAMPLE_RATE}:
            raise ValueError(f"engine {self.engine!r} decodes at {sorted(rates)} Hz; legs feed {SAMPLE_RATE} Hz")
        self._calibrate()
        for i in range(self.size):
            t = threading.Thread(target=self._worker, args=(i,), name=f"whisper-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("recognizer_pool_started", engine=self.engine, size=self.size, threads=self.threads, model=self.model_path)

    def _calibrate(self) -> None:
        """Time the calibration clip on every context at once (as they run under load), before
        the workers start: the speed admission assumes until finals measure it."""
        clip, took = calibration_clip(), [0.0] * len(self.engines)

        def run(i: int, eng: Engine) -> None:
            t0 = time.monotonic()
            eng.decode(clip, CALIBRATION_OPTIONS)
            took[i] = time.monotonic() - t0

        runners = [threading.Thread(target=run, args=(i, e), name=f"whisper-calibrate-{i}")
                   for i, e in enumerate(self.engines)]
        for t in runners:
            t.start()
        for t in runners:
            t.join()
        self.calibrated_speed = self._speed = float(np.median(took)) / CALIBRATION_AUDIO_S
        log.info("recognizer_pool_calibrated", decode_s_per_audio_s=round(self.calibrated_speed, 4),
                 clip_s=CALIBRATION_AUDIO_S, contexts=len(self.engines))

    @property
    def multilingual(self) -> bool:
        return bool(self.engines and self.engines[0].multilingual)

    @property
    def languages(self) -> frozenset[str]:
        """The language codes the engine knows (empty before `start`)."""
        return self.engines[0].languages if self.engines else frozenset()

    @property
    def hypothesis_filter(self) -> HypothesisFilter:
        """The engine's test for invented text, which the legs apply to what they decode."""
        if not self.engines:
            raise RuntimeError("recognizer pool not started")
        return self.engines[0].hypothesis_filter

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for job in self._heap:
                if job.cancelled:  # nobody awaits it (and its loop may be gone)
                    continue
                job.cancelled = True
                _deliver(job, _fail, RuntimeError("recognizer pool closed"))
            self._heap.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=30)
        self._threads.clear()

    # -- queue ---------------------------------------------------------------------------------
    def queue_depth(self) -> dict[str, int]:
        with self._cv:
            depth = {p.name.lower(): 0 for p in Priority}
            for job in self._heap:
                if not job.cancelled:
                    depth[Priority(job.priority).name.lower()] += 1
            return depth

    def load(self) -> float:
        """Waiting plus running decodes per context: above 1 the pool is behind."""
        with self._cv:
            waiting = sum(1 for j in self._heap if not j.cancelled)
            return (waiting + self.busy) / self.size

    def finals_waiting(self) -> int:
        with self._cv:
            return sum(1 for j in self._heap if not j.cancelled and j.priority == Priority.FINAL)

    def final_timing(self, window_s: float) -> FinalTiming:
        """Finals over the last `window_s`: their p95 time in the pool, the oldest one still
        waiting, and how busy finals alone keep the contexts (the part of the load that cannot
        be shed: partials are superseded or dropped under load, finals never are)."""
        now = time.monotonic()
        with self._cv:
            while self._recent_finals and now - self._recent_finals[0][0] > window_s:
                self._recent_finals.popleft()
            recent = list(self._recent_finals)
            waiting = [now - j.enqueued for j in self._heap if not j.cancelled and j.priority == Priority.FINAL]
        span = max(1e-3, min(window_s, now - self._started_at))
        lat = float(np.quantile([r[1] for r in recent], 0.95)) if recent else None
        busy, audio = sum(r[2] for r in recent), sum(r[3] for r in recent)
        source = "calibration"
        with self._cv:
            if audio >= SPEED_EVIDENCE_AUDIO_S:
                self._speed, source = busy / audio, "finals"
            elif self._speed != self.calibrated_speed:
                source = "finals"  # the last window that had enough: newer than the calibration
            speed = self._speed
        return FinalTiming(window_s, len(recent), lat, max(waiting, default=0.0), busy / (span * self.size),
                           speed, source)

    async def decode(
        self,
        audio: np.ndarray,
        opts: DecodeOptions,
        priority: Priority = Priority.FINAL,
        key: Hashable | None = None,
    ) -> Hypothesis:
        """Queue a decode; for partials, `key` (the leg) coalesces: a newer one supersedes."""
        if not self._threads:
            raise RuntimeError("recognizer pool not started")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        job = _Job(int(priority), next(self._seq), audio, opts, fut, loop, key, time.monotonic())
        with self._cv:
            if self._closed:
                raise RuntimeError("recognizer pool closed")
            if priority == Priority.PARTIAL and key is not None:
                old = self._pending_partial.pop(key, None)
                if old is not None and not old.cancelled:
                    old.cancelled = True
                    self.superseded += 1
                    loop.call_soon(_fail, old.future, Superseded("superseded by a newer partial"))
                self._pending_partial[key] = job
            heapq.heappush(self._heap, job)
            self._cv.notify()
        try:
            return await fut
        except asyncio.CancelledError:
            job.cancelled = True
            with self._cv:  # a cancelled partial must not stay its leg's pending one (it holds the audio)
                if key is not None and self._pending_partial.get(key) is job:
                    del self._pending_partial[key]
            raise

    # -- workers -------------------------------------------------------------------------------
    def _next_job(self) -> _Job | None:
        with self._cv:
            while True:
                while self._heap and self._heap[0].cancelled:
                    heapq.heappop(self._heap)
                if self._heap:
                    job = heapq.heappop(self._heap)
                    if job.key is not None and self._pending_partial.get(job.key) is job:
                        del self._pending_partial[job.key]
                    waited = time.monotonic() - job.enqueued
                    if job.priority == Priority.PARTIAL and waited > self.partial_max_wait_s:
                        self.superseded += 1
                        _deliver(job, _fail, Superseded("partial went stale in queue"))
                        continue
                    self.busy += 1
                    self.wait_hist[Priority(job.priority)].observe(waited)
                    return job
                if self._closed:
                    return None
                self._cv.wait()

    def release_scratch(self) -> int:
        """Reload every engine that holds memory its past decodes left (`Engine.holds_scratch`:
        whisper.cpp keeps its largest decode's buffers); returns how many. Blocking (a model load
        each): run it in a thread when idle. A replaced engine serves decodes until the new one is
        in place and is freed after its last one."""
        reloaded = 0
        for i in range(len(self.engines)):
            if self._closed or not self.engines[i].holds_scratch():
                continue
            fresh = self._factory()
            with self._cv:
                old, self.engines[i] = self.engines[i], fresh
            del old
            reloaded += 1
        self.reloads += reloaded
        return reloaded

    def _worker(self, i: int) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            try:
                hyp = self.engines[i].decode(job.audio, job.opts)  # per job: release_scratch may replace it
            except BaseException as e:  # noqa: BLE001 - delivered to the awaiting leg
                _deliver(job, _fail, e)
            else:
                pr = Priority(job.priority)
                self.decode_hist[pr].observe(hyp.decode_s)
                self.completed[pr] += 1
                if pr is Priority.FINAL:
                    now = time.monotonic()
                    with self._cv:
                        self._recent_finals.append((now, now - job.enqueued, hyp.decode_s, hyp.audio_s))
                self.retried += int(hyp.retried)
                _deliver(job, _resolve, hyp)
            finally:
                with self._cv:
                    self.busy -= 1

    def stats(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "threads_per_context": self.threads,
            "busy": self.busy,
            "queue_depth": self.queue_depth(),
            "completed": {p.name.lower(): n for p, n in self.completed.items()},
            "superseded_partials": self.superseded,
            "loop_retries": self.retried,
            "decode_seconds": {p.name.lower(): h.snapshot() for p, h in self.decode_hist.items()},
            "queue_wait_seconds": {p.name.lower(): h.snapshot() for p, h in self.wait_hist.items()},
        }


def _deliver(job: _Job, how: Callable[[asyncio.Future, Any], None], value: Any) -> None:
    """Hand a result to the job's loop; a loop already closed (its caller is gone, e.g. at
    shutdown) must not take the worker thread down with it."""
    try:
        job.loop.call_soon_threadsafe(how, job.future, value)
    except RuntimeError:  # "Event loop is closed"
        pass


def _resolve(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
