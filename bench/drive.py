"""Play audio into streaming recognizers the way a live call would, and record what comes out.

Shared by tests and benchmarks: audio goes in 20 ms frames, optionally at a real-time pace
(a live call cannot send audio faster than it is spoken), and every event is stamped with the
wall-clock time it was emitted and the stream time that was playing then.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from bridge.events.types import Final, Partial
from bridge.recognizer.pool import RecognizerPool
from bridge.recognizer.streamer import StreamerConfig, StreamingRecognizer

SR = 16000


@dataclass
class Stamped:
    event: Any
    wall: float  # seconds since playback start
    stream: float  # stream seconds already fed at that moment


@dataclass
class LegRun:
    recognizer: StreamingRecognizer
    events: list[Stamped] = field(default_factory=list)
    t0: float = 0.0
    pace: float | None = None

    @property
    def finals(self) -> list[Final]:
        return [s.event for s in self.events if isinstance(s.event, Final)]

    @property
    def partials(self) -> list[Partial]:
        return [s.event for s in self.events if isinstance(s.event, Partial)]

    @property
    def text(self) -> str:
        return " ".join(f.text for f in self.finals)


def new_leg(pool: RecognizerPool, config: StreamerConfig | None = None, channel: int = 0,
            speaker: str | None = None) -> LegRun:
    run = LegRun(recognizer=None)  # type: ignore[arg-type]

    def emit(ev: Any) -> None:
        run.events.append(Stamped(ev, time.monotonic() - run.t0, run.recognizer.stream_seconds))

    run.recognizer = StreamingRecognizer(pool, emit, channel=channel, speaker=speaker or f"ch{channel}",
                                         config=config or StreamerConfig())
    return run


async def play(run: LegRun, pcm: np.ndarray, pace: float | None = 1.0, frame_ms: int = 20,
               actions: dict[int, Callable[[StreamingRecognizer], None]] | None = None,
               finish: bool = True) -> LegRun:
    """Feed `pcm` in frames; `pace` 1.0 is real time, None as fast as the loop allows.

    `actions` maps a sample index to a call made just before that sample is fed (configure,
    force_endpoint) so tests can act at exact stream positions.
    """
    rec = run.recognizer
    run.pace = pace
    if run.t0 == 0.0:
        run.t0 = time.monotonic()
    rec.start()
    step = SR * frame_ms // 1000
    pending = sorted((actions or {}).items())
    base = rec.samples_in + len(rec._vad_left)
    for i in range(0, len(pcm), step):
        while pending and pending[0][0] <= i:
            pending.pop(0)[1](rec)
        rec.feed(pcm[i : i + step])
        if pace:
            due = run.t0 + (base + i + step) / SR / pace
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        else:
            await asyncio.sleep(0)
    for _, fn in pending:
        fn(rec)
    if finish:
        await rec.finish()
    return run


async def play_many(pool: RecognizerPool, clips: Sequence[np.ndarray], pace: float | None = 1.0,
                    config: StreamerConfig | None = None) -> list[LegRun]:
    """Several legs at once, as concurrent calls."""
    runs = [new_leg(pool, config, channel=i) for i in range(len(clips))]
    t0 = time.monotonic()
    for r in runs:
        r.t0 = t0
    await asyncio.gather(*(play(r, c, pace) for r, c in zip(runs, clips)))
    return runs


async def wait_for(pred: Callable[[], bool | Awaitable[bool]], timeout: float = 20.0) -> bool:
    """Until `pred()` holds (a coroutine function is awaited: the stores are async), every 20 ms."""
    async def holds() -> bool:
        r = pred()
        return await r if inspect.isawaitable(r) else r

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await holds():
            return True
        await asyncio.sleep(0.02)
    return await holds()


async def stream_at_pace(s: Any, data: bytes, rate: int, tail_s: float, timeout: float) -> tuple[float, list[tuple[float, dict]]]:
    """Play 16-bit mono `data` into an open StreamClient `s` in 20 ms frames at real-time pace,
    then `tail_s` of nothing and `end`; returns (start time, [(arrival time, final event)])."""
    step = rate // 50 * 2
    finals: list[tuple[float, dict]] = []
    t0 = time.monotonic()

    async def send() -> None:
        for k in range(0, len(data), step):
            await s.send_audio(data[k : k + step])
            await asyncio.sleep(max(0.0, t0 + (k + step) / 2 / rate - time.monotonic()))
        await asyncio.sleep(tail_s)
        await s.end()

    sender = asyncio.create_task(send())
    async with asyncio.timeout(timeout):
        async for ev in s:
            if ev["type"] == "final":
                finals.append((time.monotonic(), ev))
    await sender
    return t0, finals
