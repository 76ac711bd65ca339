"""The process-wide scheduler: a few whisper.cpp contexts shared by every leg.

A whisper context costs ~100 MB (tiny) and a decode saturates its threads, so legs do not get
their own: they queue here. Finals go before partials (a final is what users keep; a partial is
superseded within a second anyway); each leg has at most one partial waiting, a newer one
replaces it, and partials that waited too long are dropped. Finals are never dropped.
Decodes run in worker threads (whisper_full releases the GIL), off the event loop.
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

from .engine import DecodeOptions, Hypothesis, WhisperEngine

log = structlog.get_logger(__name__)

# A whisper.cpp context allocates its buffers for the full 30 s window when it loads, and keeps
# resident what its largest decode touched (tiny.en: 91 MB after 2 s decodes, 109 MB after 10 s,
# 191 MB after a full window; python -m bench.memory --context). Contexts whose largest decode
# since they loaded went past this many encoder positions (10 s) are reloaded when the service
# goes idle (release_scratch), so each retry over the full window does not keep ~100 MB forever.
RELOAD_ABOVE_CTX = 564
FULL_CTX = 1500  # encoder positions of whisper's 30 s window


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


@dataclass(frozen=True)
class FinalTiming:
    """How the pool has been serving finals lately: what admission (bridge/admission.py) reads."""

    window_s: float
    finals: int  # finals decoded in the window
    latency_p95_s: float | None  # p95 of queue wait + decode over those finals; None without any
    oldest_waiting_s: float  # age of the oldest final still queued (0 when none): lateness not yet observed
    utilization: float  # share of the contexts' time spent decoding finals in the window


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
    """Shared decode pool. `size` contexts, each decoding with `threads` threads."""

    def __init__(
        self,
        model_path: str | Path,
        size: int | None = None,
        threads: int = 1,
        partial_max_wait_s: float = 1.0,
        engine_factory: Callable[[], WhisperEngine] | None = None,
    ) -> None:
        self.model_path = str(model_path)
        self.size = size or os.cpu_count() or 1
        self.threads = threads
        self.partial_max_wait_s = partial_max_wait_s
        self._factory = engine_factory or (lambda: WhisperEngine(self.model_path, n_threads=self.threads))
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
        self.engines: list[WhisperEngine] = []
        self._peak_ctx: list[int] = []  # per context: its largest decode since it loaded
        self.reloads = 0  # contexts reloaded by release_scratch
        # (done, wait + decode, decode) of recent finals; bounded so a busy pool cannot grow it
        self._recent_finals: deque[tuple[float, float, float]] = deque(maxlen=4096)
        self._started_at = time.monotonic()

    def start(self) -> None:
        """Load the contexts (blocking: seconds) and start the workers."""
        if self._threads:
            return
        self.engines = [self._factory() for _ in range(self.size)]
        self._peak_ctx = [0] * self.size
        for i in range(self.size):
            t = threading.Thread(target=self._worker, args=(i,), name=f"whisper-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("recognizer_pool_started", size=self.size, threads=self.threads, model=self.model_path)

    @property
    def multilingual(self) -> bool:
        return bool(self.engines and self.engines[0].multilingual)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for job in self._heap:
                if job.cancelled:  # nobody awaits it (and its loop may be gone)
                    continue
                job.cancelled = True
                job.loop.call_soon_threadsafe(_fail, job.future, RuntimeError("recognizer pool closed"))
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
        busy = sum(r[2] for r in recent)
        return FinalTiming(window_s, len(recent), lat, max(waiting, default=0.0), busy / (span * self.size))

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
                        job.loop.call_soon_threadsafe(_fail, job.future, Superseded("partial went stale in queue"))
                        continue
                    self.busy += 1
                    self.wait_hist[Priority(job.priority)].observe(waited)
                    return job
                if self._closed:
                    return None
                self._cv.wait()

    def _decode(self, i: int, job: _Job) -> Hypothesis:
        engine = self.engines[i]  # looked up per job: release_scratch may have replaced it
        hyp = engine.decode(job.audio, job.opts)
        ctx = FULL_CTX if hyp.retried or job.opts.full_ctx else engine.audio_ctx_for(len(job.audio), job.opts)
        with self._cv:
            if self.engines[i] is engine:
                self._peak_ctx[i] = max(self._peak_ctx[i], ctx)
        return hyp

    def release_scratch(self) -> int:
        """Reload every context whose largest decode went past RELOAD_ABOVE_CTX, giving back the
        buffer pages it touched; returns how many. Blocking (a model load each): run it in a
        thread when idle. A replaced context serves decodes until the new one is in place and is
        freed after its last one."""
        reloaded = 0
        for i in range(len(self.engines)):
            if self._closed or self._peak_ctx[i] <= RELOAD_ABOVE_CTX:
                continue
            fresh = self._factory()
            with self._cv:
                old, self.engines[i], self._peak_ctx[i] = self.engines[i], fresh, 0
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
                hyp = self._decode(i, job)
            except BaseException as e:  # noqa: BLE001 - delivered to the awaiting leg
                job.loop.call_soon_threadsafe(_fail, job.future, e)
            else:
                pr = Priority(job.priority)
                self.decode_hist[pr].observe(hyp.decode_s)
                self.completed[pr] += 1
                if pr is Priority.FINAL:
                    now = time.monotonic()
                    with self._cv:
                        self._recent_finals.append((now, now - job.enqueued, hyp.decode_s))
                self.retried += int(hyp.retried)
                job.loop.call_soon_threadsafe(_resolve, job.future, hyp)
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


def _resolve(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
