"""The call model every ingress shares: a Call is one job, a Leg one channel with its recognizer.

An ingress (WebSocket stream, SIP, WebRTC) creates a Call, opens it, pushes 16 kHz PCM16 per
channel into `feed`, and ends it with `finish`. The Call records the audio (one WAV channel per
leg, written as it arrives), persists each final before publishing it ("saved before seen": a
final a client has received survives a crash), publishes everything on the bus, and ticks usage.
It knows nothing about sockets.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from bridge.audio.wav import WavRecorder
from bridge.backlog import WriteBacklog
from bridge.events.bus import EventBus
from bridge.events.types import CallEnded, CallStarted, Dtmf, Final, Usage
from bridge.jobs.model import Job, JobStatus
from bridge.logs import get_logger
from bridge.recognizer.pool import RecognizerPool
from bridge.recognizer.leg import LegRecognizer, new_leg_recognizer
from bridge.recognizer.streamer import SAMPLE_RATE, StreamerConfig
from bridge.recordings import Recordings
from bridge.storage import StorageFull, StorageGuard, is_storage_full
from bridge.stores import JobStore

__all__ = ["Call", "CallRegistry", "Leg", "credits_for", "ended_event", "job_credits"]

log = get_logger("bridge.calls")


def credits_for(seconds: float, channels: int, per_minute: float) -> float:
    """Credits are charged per minute of audio, each channel counted."""
    return seconds * channels * per_minute / 60.0


def job_credits(job: Job, per_minute: float) -> float:
    """What a saved job's audio cost: its stored duration x its channels."""
    return credits_for(job.duration_s or 0.0, max(1, len(job.speakers)), per_minute)


def ended_event(job: Job, per_minute: float) -> CallEnded:
    """The `call_ended` of a job read back from the store, for sinks that were not there when
    it was published (a dashboard joining a finished job, webhooks after a crash)."""
    return CallEnded(job.status.value, job.duration_s or 0.0, job_credits(job, per_minute), job.error)


@dataclass
class Leg:
    channel: int
    speaker: str
    recognizer: LegRecognizer


class Call:
    """One live job. Not thread-safe: use it from the event loop only."""

    def __init__(
        self,
        job: Job,
        *,
        store: JobStore,
        bus: EventBus,
        pool: RecognizerPool,
        streamer_config: StreamerConfig,
        recordings: Recordings,
        credits_per_minute: float,
        usage_interval_s: float,
        storage: StorageGuard | None = None,
        backlog: WriteBacklog | None = None,
    ) -> None:
        if not job.speakers:
            raise ValueError("a call needs at least one speaker label")
        self.job = job
        self.store = store
        self.bus = bus
        self.pool = pool
        self.streamer_config = streamer_config
        self.recordings = recordings
        self.credits_per_minute = credits_per_minute
        self.usage_interval_s = usage_interval_s
        self.storage = storage
        # writes after the job's creation wait here while the database is unreachable (bridge/backlog.py)
        self.backlog = backlog if backlog is not None else WriteBacklog()
        self.session_id = "sess_" + secrets.token_hex(8)
        self.legs: list[Leg] = []
        self.leg_samples: list[int] = [0] * len(job.speakers)  # 16 kHz samples received per leg
        self.finals = 0
        self.dtmf: list[dict[str, Any]] = []
        self.stop_requested = asyncio.Event()  # set by drain (SIGTERM): the ingress should end the call
        self.failure: asyncio.Future[BaseException] | None = None
        self.storage_error: StorageFull | None = None  # set when the disk filled during this call
        self.log = log.bind(job_id=job.id, session_id=self.session_id)
        self._recorder: WavRecorder | None = None
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._pump: asyncio.Task | None = None
        self._ticker: asyncio.Task | None = None
        self._finished: asyncio.Future[Job] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.job.id

    @property
    def channels(self) -> int:
        return len(self.job.speakers)

    async def open(self) -> None:
        """Create the job row and the recording, start one recognizer per leg."""
        loop = asyncio.get_running_loop()
        self.failure = loop.create_future()
        self.recordings.live_dir.mkdir(parents=True, exist_ok=True)
        path = self.recordings.live_path(self.job.id)
        self.job.audio_path = str(path)
        self._recorder = WavRecorder(path, channels=self.channels)
        try:
            await self.store.create_job(self.job)
        except BaseException:  # no job row: no recording either
            self._recorder.abandon()
            path.unlink(missing_ok=True)
            raise
        for ch, speaker in enumerate(self.job.speakers):
            rec = new_leg_recognizer(
                self.pool, self._events.put_nowait, channel=ch, speaker=speaker,
                config=replace(self.streamer_config),
                logger=self.log.bind(channel=ch, speaker=speaker))
            self.legs.append(Leg(ch, speaker, rec))
        for leg in self.legs:
            leg.recognizer.start().add_done_callback(self._leg_done)
        self._pump = loop.create_task(self._pump_events(), name=f"events-{self.job.id}")
        self._ticker = loop.create_task(self._tick_usage(), name=f"usage-{self.job.id}")
        self._publish(CallStarted(self.job.source.value, tuple(self.job.speakers), self.job.config,
                                  self.job.metadata))
        self.log.info("call_started", source=self.job.source.value, speakers=self.job.speakers)

    def _leg_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or self.failure is None or self.failure.done():
            return
        exc = task.exception()
        if exc is not None:
            self.log.error("leg_failed", error=repr(exc))
            self.failure.set_result(exc)

    def _storage_failed(self, exc: BaseException) -> None:
        """A write failed for lack of space: stop recording (what the file holds stays, its header
        matching) and fail the call with StorageFull, which its ingress turns into STORAGE_FULL.
        Never raises: SIP feeds audio from the worker channel's reader. Event loop only."""
        if self.storage is not None:
            self.storage.exhaust(exc)
        if self._recorder is not None:
            self._recorder.abandon()
        if self.storage_error is None:
            self.storage_error = StorageFull("the server's disk is full; the audio and finals received until now "
                                             "are saved")
            self.log.error("call_storage_full", error=repr(exc), recorded_s=round(self.recorded_seconds, 3))
        if self.failure is not None and not self.failure.done():
            self.failure.set_result(self.storage_error)

    def _try_write(self, write: Any, *args: Any) -> BaseException | None:
        """Run a recorder write; the full-disk error it raised, else None. Safe in a worker thread."""
        if self.storage_error is not None:
            return self.storage_error
        if self.storage is not None and self.storage.exhausted:
            return StorageFull("another write found the disk full")
        try:
            write(*args)
        except OSError as e:
            if not is_storage_full(e):
                raise
            return e
        return None

    def _record(self, write: Any, *args: Any) -> bool:
        """Write to the recording; False (the call failed) when the disk is or was just full."""
        exc = self._try_write(write, *args)
        if exc is not None:
            self._storage_failed(exc)
        return exc is None

    async def _record_in_thread(self, write: Any, *args: Any) -> None:
        exc = await asyncio.to_thread(self._try_write, write, *args)
        if exc is not None:
            self._storage_failed(exc)

    # -- audio and control ---------------------------------------------------------------------
    def feed(self, chans: list[np.ndarray]) -> None:
        """One frame of 16 kHz int16 audio per channel (as `AudioFrontEnd.feed` returns)."""
        if len(chans) != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {len(chans)}")
        if not self._record(self._recorder.write_frames, chans):  # type: ignore[union-attr]
            return
        for leg, pcm in zip(self.legs, chans):
            if len(pcm):
                leg.recognizer.feed(pcm)
                self.leg_samples[leg.channel] += len(pcm)

    def feed_leg(self, channel: int, pcm: np.ndarray) -> None:
        """16 kHz int16 audio of one leg, for ingresses whose legs arrive separately (SIP, WebRTC)."""
        if not self._record(self._recorder.write, channel, pcm):  # type: ignore[union-attr]
            return
        if len(pcm):
            self.legs[channel].recognizer.feed(pcm)
            self.leg_samples[channel] += len(pcm)

    def publish(self, event: Any) -> None:
        """An ingress event that is not audio (e.g. DTMF), in order with the legs' events."""
        self._events.put_nowait(event)

    def force_endpoint(self) -> None:
        for leg in self.legs:
            leg.recognizer.force_endpoint()

    def configure(self, endpointing_ms: int) -> None:
        self.streamer_config = replace(self.streamer_config, endpointing_ms=endpointing_ms)
        for leg in self.legs:
            leg.recognizer.configure(endpointing_ms=endpointing_ms)

    def request_stop(self, reason: str) -> None:
        self.log.info("stop_requested", reason=reason)
        self.stop_requested.set()

    async def annotate(self, **fields: Any) -> None:
        """Merge `fields` into the job's metadata and save it (DTMF digits, how the call ended)."""
        self.job.metadata = metadata = {**self.job.metadata, **fields}
        await self.backlog.write(self.job.id, "metadata", lambda: self.store.update_job(self.job.id, metadata=metadata))

    @property
    def streamed_seconds(self) -> float:
        """Audio received, per channel: the longest leg (legs of one call run side by side)."""
        return max(self.leg_samples) / SAMPLE_RATE

    @property
    def recorded_seconds(self) -> float:
        """Audio in the recording (per channel); short of `streamed_seconds` only when the disk filled."""
        return self._recorder.seconds if self._recorder is not None else 0.0

    @property
    def credits_used(self) -> float:
        return credits_for(self.streamed_seconds, self.channels, self.credits_per_minute)

    def usage(self) -> Usage:
        return Usage(self.streamed_seconds, self.credits_used)

    # -- events --------------------------------------------------------------------------------
    def _publish(self, event: Any) -> None:
        self.bus.publish(self.job.id, event, owner=self.job.owner, source=self.job.source.value)

    async def _pump_events(self) -> None:
        """Persist finals, then publish, in the order the legs emitted them."""
        while True:
            ev = await self._events.get()
            if ev is None:
                return
            if isinstance(ev, Dtmf):
                self.dtmf.append(ev.to_dict())
            try:
                await self._save_event(ev)
            except Exception as e:  # noqa: BLE001 - storage trouble must not kill live captions
                if not is_storage_full(e):
                    self.log.error("event_not_saved", type=ev.type.value, error=repr(e))
                else:  # the disk is full: end the call, and save this one in the room that frees
                    self._storage_failed(e)
                    try:
                        await self._save_event(ev)
                    except Exception as e2:  # noqa: BLE001
                        self.log.error("event_not_saved", type=ev.type.value, error=repr(e2))
            self._publish(ev)

    async def _save_event(self, ev: Any) -> None:
        if isinstance(ev, Final):
            final = ev.to_dict()  # saved now, or queued until the database answers: never dropped
            await self.backlog.write(self.job.id, "segment", lambda: self.store.add_segment(self.job.id, final))
            self.finals += 1
        elif isinstance(ev, Dtmf):
            await self.annotate(dtmf=list(self.dtmf))

    async def _tick_usage(self) -> None:
        while True:
            await asyncio.sleep(self.usage_interval_s)
            self._publish(self.usage())
            if self._recorder is not None:
                await self._record_in_thread(self._recorder.flush)

    # -- end -----------------------------------------------------------------------------------
    async def finish(self, status: JobStatus = JobStatus.COMPLETED, error: dict[str, Any] | None = None) -> Job:
        """Flush every leg, wait for its finals to be saved and published, close the recording,
        and mark the job. Idempotent: later calls return the first result."""
        if self._finished is not None:
            return await asyncio.shield(self._finished)
        self._finished = asyncio.get_running_loop().create_future()
        try:
            job = await self._finish(status, error)
        except BaseException as e:
            self._finished.set_exception(e)
            raise
        self._finished.set_result(job)
        return job

    async def _finish(self, status: JobStatus, error: dict[str, Any] | None) -> Job:
        if self._ticker is not None:
            self._ticker.cancel()
        results = await asyncio.gather(*(leg.recognizer.finish() for leg in self.legs), return_exceptions=True)
        for leg, r in zip(self.legs, results):
            if isinstance(r, BaseException):
                self.log.error("leg_flush_failed", channel=leg.channel, error=repr(r))
                if status is JobStatus.COMPLETED:
                    status = JobStatus.FAILED
                    error = error or {"code": "INTERNAL", "message": f"recognizer of channel {leg.channel} failed"}
        self._events.put_nowait(None)
        if self._pump is not None:
            await self._pump
        if self._recorder is not None:
            await self._record_in_thread(self._recorder.close)
        if self.storage_error is not None and status is JobStatus.COMPLETED:
            status, error = JobStatus.FAILED, {"code": StorageFull.code, "message": self.storage_error.message}
        self.job.status = status
        self.job.error = error
        self.job.duration_s = self.streamed_seconds
        await self._save_ending(status, error)
        await self._shelve_recording()
        self._publish(self.usage())
        self._publish(CallEnded(status.value, self.streamed_seconds, self.credits_used, error))
        self.log.info("call_ended", status=status.value, streamed_seconds=round(self.streamed_seconds, 3),
                      finals=self.finals, error=(error or {}).get("code"))
        return self.job

    async def _shelve_recording(self) -> None:
        """Move the closed recording to the archive every node reads (bridge/recordings.py), after
        the job is saved as ended (a failure here must not leave it live) and before `call_ended`
        goes out (whoever fetches the audio on that event finds it in its final place)."""
        shelved = await self.recordings.shelve(self.job.id, self.job.audio_path)
        if shelved is None:
            return
        self.job.audio_path = shelved
        try:
            await self.backlog.write(self.job.id, "audio_path", lambda: self.store.update_job(self.job.id, audio_path=shelved))
        except Exception as e:  # noqa: BLE001 - the file is in the archive under the job's id either way
            self.log.error("recording_path_not_saved", path=shelved, error=repr(e))

    async def _save_ending(self, status: JobStatus, error: dict[str, Any] | None) -> None:
        """Mark the job ended; on a full disk free the emergency reserve and try once more, so the
        job does not stay `live` (which would also keep DELETE from freeing its space)."""
        seconds = self.streamed_seconds

        def save() -> Any:
            return self.store.finish_job(self.job.id, status, seconds, error)

        try:
            await self.backlog.write(self.job.id, "finish", save)
        except Exception as e:
            if not is_storage_full(e) or self.storage is None:
                raise
            await asyncio.to_thread(self.storage.exhaust, e)
            await self.store.finish_job(self.job.id, status, seconds, error)

    async def abort(self) -> None:
        """Stop the recognizers without flushing (server shutdown past its drain deadline)."""
        for leg in self.legs:
            await leg.recognizer.aclose()
        if self._ticker is not None:
            self._ticker.cancel()


class CallRegistry:
    """Live calls, concurrent sessions per owner, and drain on shutdown."""

    def __init__(self) -> None:
        self.calls: dict[str, Call] = {}
        self._owners: dict[str, int] = {}
        self._owner_of: dict[str, str] = {}
        self.draining = False
        self._empty = asyncio.Event()
        self._empty.set()
        self.on_idle: Callable[[], None] | None = None  # called when the last live call is removed

    def admit(self, owner: str, limit: int | None) -> bool:
        """Take a session slot for `owner`, or return False when at `limit`."""
        if self.draining:
            return False
        n = self._owners.get(owner, 0)
        if limit is not None and n >= limit:
            return False
        self._owners[owner] = n + 1
        return True

    def release(self, owner: str) -> None:
        n = self._owners.get(owner, 0) - 1
        if n > 0:
            self._owners[owner] = n
        else:
            self._owners.pop(owner, None)

    def active(self, owner: str) -> int:
        return self._owners.get(owner, 0)

    def add(self, call: Call, owner: str) -> None:
        self.calls[call.id] = call
        self._owner_of[call.id] = owner
        self._empty.clear()
        if self.draining:
            call.request_stop("server is shutting down")

    def remove(self, call: Call) -> None:
        self.calls.pop(call.id, None)
        self._owner_of.pop(call.id, None)
        if not self.calls:
            self._empty.set()
            if self.on_idle is not None:
                self.on_idle()

    @property
    def legs(self) -> int:
        return sum(c.channels for c in self.calls.values())

    async def drain(self, timeout_s: float) -> list[str]:
        """Refuse new sessions, ask live ones to end (finalized and saved), wait up to `timeout_s`.
        Returns the ids of calls still live at the deadline."""
        self.draining = True
        for call in list(self.calls.values()):
            call.request_stop("server is shutting down")
        try:
            await asyncio.wait_for(self._empty.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        return list(self.calls)
