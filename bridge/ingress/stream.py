"""The ingest WebSocket, `GET /v1/transcription/stream` (docs/stream-protocol.md).

Wire in, Call out: this module parses client frames, enforces the session limits, and turns a
session into a Call (bridge/calls.py) fed through the audio front-end. It writes to the socket
from one place at a time: `ready` before the event forwarder starts, `completed`/`error` after it
has drained, so a final is never overtaken by the frame that ends the session.

Session order: upgrade (auth refused with HTTP 401 before it) -> client `start` -> `ready` ->
audio and control frames -> `end` -> finals flushed -> `completed` -> close 1000. A refused start
(INVALID_CONFIG, RATE_LIMITED, INSUFFICIENT_CREDITS, STORAGE_FULL) gets `error` and creates no job. An error
after `ready` ends the job with what was received so far saved, then `error` and a 4xxx close.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from bridge.admission import CapacityRefused
from bridge.api.http import JsonInputError, json_error, parse_json, release_heartbeat, require_principal
from bridge.audio.codecs import InvalidAudio, InvalidAudioConfig
from bridge.audio.frontend import AudioFormat, AudioFrontEnd
from bridge.auth import InsufficientCredits, Principal
from bridge.calls import Call, credits_for
from bridge.events.types import EventType
from bridge.jobs.model import InvalidText, Job, JobSource, JobStatus, check_label, is_unsafe_char, new_job_id
from bridge.logs import bind_job, get_logger
from bridge.recognizer.streamer import ENDPOINTING_RANGE, StreamerConfig
from bridge.storage import StorageFull, is_storage_full

if TYPE_CHECKING:
    from bridge.service import Service

__all__ = ["ErrorCode", "CLOSE_CODES", "StartConfig", "SessionError", "add_routes", "admit_call", "apply_control",
           "completed_frame", "failure_error", "settle_call", "wire_frame"]

log = get_logger("bridge.ingress.stream")
PATH = "/v1/transcription/stream"


class ErrorCode(str, Enum):
    INVALID_CONFIG = "INVALID_CONFIG"
    INVALID_AUDIO = "INVALID_AUDIO"
    INSUFFICIENT_CREDITS = "INSUFFICIENT_CREDITS"
    MAX_DURATION_REACHED = "MAX_DURATION_REACHED"
    IDLE_TIMEOUT = "IDLE_TIMEOUT"
    RATE_LIMITED = "RATE_LIMITED"
    UPSTREAM_ERROR = "UPSTREAM_ERROR"
    INTERNAL = "INTERNAL"
    STORAGE_FULL = "STORAGE_FULL"  # ours: the data directory is full (or under its reserve)


# WebSocket close codes after an `error` frame (4000-4999 is the application range), HTTP-like.
CLOSE_CODES: dict[ErrorCode, int] = {
    ErrorCode.INVALID_CONFIG: 4400,
    ErrorCode.INSUFFICIENT_CREDITS: 4402,
    ErrorCode.IDLE_TIMEOUT: 4408,
    ErrorCode.MAX_DURATION_REACHED: 4413,
    ErrorCode.INVALID_AUDIO: 4415,
    ErrorCode.RATE_LIMITED: 4429,
    ErrorCode.INTERNAL: 4500,
    ErrorCode.UPSTREAM_ERROR: 4502,
    ErrorCode.STORAGE_FULL: 4507,
}
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the server is shutting down (the session was still completed and saved)

# A session that reached one of these still has a complete transcript of what it received.
_COMPLETING = {ErrorCode.MAX_DURATION_REACHED, ErrorCode.IDLE_TIMEOUT}

MAX_WORD_BOOST = 100
MAX_METADATA_BYTES = 16384


MAX_MESSAGE_CHARS = 300  # an error message quotes client values; it stays one short line


class SessionError(Exception):
    """`retry_after_s`: the refusal is temporary (sent as `retry_after_s` in the frame, Retry-After over
    HTTP); `http_status`: what an HTTP ingress answers instead of the code's usual status."""

    def __init__(self, code: ErrorCode, message: str, *, retry_after_s: int | None = None,
                 http_status: int | None = None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "..."
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.http_status = http_status

    @classmethod
    def over_capacity(cls, refused: CapacityRefused) -> "SessionError":
        """The server has no decode capacity for the session: RATE_LIMITED on the socket, 503 over HTTP."""
        return cls(ErrorCode.RATE_LIMITED, refused.reason, retry_after_s=refused.retry_after_s, http_status=503)

    def frame(self) -> dict[str, Any]:
        out = {"type": "error", "code": self.code.value, "message": self.message}
        if self.retry_after_s is not None:
            out["retry_after_s"] = self.retry_after_s
        return out


def failure_error(exc: BaseException) -> SessionError:
    """The error a session ends with when its call failed under it (`Call.failure`) or a step
    raised: STORAGE_FULL for a full disk, else INTERNAL. Audio and finals until then are saved."""
    if is_storage_full(exc):
        msg = exc.message if isinstance(exc, StorageFull) else "the server's disk is full; what was received is saved"
        return SessionError(ErrorCode.STORAGE_FULL, msg)
    return SessionError(ErrorCode.INTERNAL, "the recognizer failed; what was received is saved")


def job_ending(err: SessionError | None) -> tuple[JobStatus, dict[str, Any] | None]:
    """The job status and saved error for a session that ended with `err` (None: a clean end).
    Limits reached still leave a complete transcript of what was received: completed."""
    if err is None:
        return JobStatus.COMPLETED, None
    status = JobStatus.COMPLETED if err.code in _COMPLETING else JobStatus.FAILED
    return status, {"code": err.code.value, "message": err.message}


def shown(value: Any, limit: int = 60) -> str:
    """A client's value quoted in an error message, cut short: a refusal stays one short line."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- start frame

_START_FIELDS = {"type", "language", "sample_rate", "channels", "encoding", "interim_results", "diarize",
                 "endpointing_ms", "word_boost", "metadata", "max_duration_seconds"}


@dataclass(frozen=True)
class StartConfig:
    """The validated `start` frame. `max_duration_seconds` (ours) lowers the server's limit for a
    session, so a key with a small balance can reserve less than the default 3 hours."""

    language: str = "en"
    sample_rate: int = 16000
    channels: int = 1
    encoding: str = "pcm_s16le"
    interim_results: bool = True
    diarize: bool = False
    endpointing_ms: int = 700
    word_boost: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    speakers: tuple[str, ...] = ("ch0",)
    max_duration_seconds: float = 10800.0
    warnings: tuple[str, ...] = ()

    @property
    def audio_format(self) -> AudioFormat:
        return AudioFormat(self.encoding, self.sample_rate, self.channels)

    def effective(self) -> dict[str, Any]:
        """What `ready` reports: every setting as the session will run it."""
        return {"language": self.language, "sample_rate": self.sample_rate, "channels": self.channels,
                "encoding": self.encoding, "interim_results": self.interim_results, "diarize": self.diarize,
                "endpointing_ms": self.endpointing_ms, "word_boost": list(self.word_boost),
                "speakers": list(self.speakers), "metadata": self.metadata}

    @classmethod
    def parse(cls, msg: Any, *, default_endpointing_ms: int, max_duration_s: float,
              multilingual: bool, languages: frozenset[str]) -> "StartConfig":
        """Validate a decoded `start` frame; raises SessionError(INVALID_CONFIG) naming the field."""

        def bad(message: str) -> SessionError:
            return SessionError(ErrorCode.INVALID_CONFIG, message)

        if not isinstance(msg, dict) or msg.get("type") != "start":
            raise bad('the first frame must be a JSON text frame {"type": "start", ...}')
        unknown = sorted(set(msg) - _START_FIELDS)
        warnings = [f"unknown field {shown(k, 40)} ignored" for k in unknown[:20]]

        def typed(name: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
            v = msg.get(name, default)
            if v is None:
                return default
            if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
                raise bad(f"{name} must be {what}, got {shown(v)}")
            return v

        language = typed("language", (str,), "en", 'a language code or "auto"').strip().lower()
        if language != "auto" and language not in languages:
            raise bad(f'language {shown(language)} is not a whisper language code (e.g. "en", "de") or "auto"')
        if not multilingual and language not in ("en", "auto"):
            raise bad(f'language {shown(language)} needs a multilingual model; this server runs an English-only '
                      f'model (use "en" or "auto", or start the server with --model base)')
        encoding = typed("encoding", (str,), "pcm_s16le", "a string")
        sample_rate = typed("sample_rate", (int,), 16000, "an integer (Hz)")
        channels = typed("channels", (int,), 1, "1 or 2")
        try:
            fmt = AudioFormat(encoding, sample_rate, channels).validate()
        except InvalidAudioConfig as e:
            raise bad(str(e)) from None
        interim = typed("interim_results", (bool,), True, "true or false")
        diarize = typed("diarize", (bool,), False, "true or false")
        if diarize:
            warnings.append("diarize: speakers are told apart by channel, not within one channel")
        endpointing = typed("endpointing_ms", (int,), default_endpointing_ms, "an integer (milliseconds)")
        lo, hi = ENDPOINTING_RANGE
        if not lo <= endpointing <= hi:
            raise bad(f"endpointing_ms must be in {lo}..{hi}, got {endpointing}")
        boost = typed("word_boost", (list,), [], "a list of strings")
        if len(boost) > MAX_WORD_BOOST or not all(isinstance(w, str) and 0 < len(w.strip()) <= 100
                                                  and not any(is_unsafe_char(c) for c in w) for w in boost):
            raise bad(f"word_boost must be at most {MAX_WORD_BOOST} non-empty strings of up to 100 characters, "
                      "without control characters")
        metadata = typed("metadata", (dict,), {}, "a JSON object")
        if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
            raise bad(f"metadata must be under {MAX_METADATA_BYTES} bytes of JSON")
        speakers: tuple[str, ...] = tuple(f"ch{i}" for i in range(fmt.channels))
        if "speakers" in metadata:
            sp = metadata["speakers"]
            if not isinstance(sp, list) or len(sp) != fmt.channels:
                raise bad(f"metadata.speakers must be a list of {fmt.channels} non-empty label(s), one per channel")
            for i, label in enumerate(sp):
                try:
                    check_label(label, f"metadata.speakers[{i}]")
                except InvalidText as e:
                    raise bad(str(e)) from None
            if len(set(sp)) != len(sp):
                raise bad("metadata.speakers labels must differ")
            speakers = tuple(s.strip() for s in sp)
        max_dur = typed("max_duration_seconds", (int, float), max_duration_s, "a number of seconds")
        if not 0 < max_dur <= max_duration_s:
            raise bad(f"max_duration_seconds must be in (0, {max_duration_s:g}], got {max_dur}")
        return cls(language=language, sample_rate=fmt.sample_rate, channels=fmt.channels,
                   encoding=fmt.encoding.value, interim_results=interim, diarize=diarize,
                   endpointing_ms=endpointing, word_boost=tuple(w.strip() for w in boost), metadata=metadata,
                   speakers=speakers, max_duration_seconds=float(max_dur), warnings=tuple(warnings))


def _parse_text(data: str) -> dict[str, Any]:
    try:
        msg = parse_json(data)
    except JsonInputError as e:
        raise SessionError(ErrorCode.INVALID_CONFIG, f"text frame refused: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise SessionError(ErrorCode.INVALID_CONFIG, 'a text frame must be a JSON object with a string "type"')
    return msg


# --------------------------------------------------------------------------- session


class _Outcome(Enum):
    END = "end"  # client sent `end`
    DISCONNECT = "disconnect"  # client went away without `end`
    DRAIN = "drain"  # server shutting down


class StreamSession:
    """One ingest WebSocket from `start` to close."""

    def __init__(self, service: "Service", ws: web.WebSocketResponse, principal: Principal) -> None:
        self.svc = service
        self.ws = ws
        self.principal = principal
        self.limits = service.config.limits
        self.call: Call | None = None
        self.start: StartConfig | None = None
        self.front: AudioFrontEnd | None = None
        self._recv: asyncio.Task | None = None
        self._sender: asyncio.Task | None = None
        self._sub: Any = None
        self.log = log.bind(owner=principal.owner)

    # -- socket helpers ------------------------------------------------------------------------
    async def _receive(self, timeout: float | None, *extra: asyncio.Future) -> Any:
        """Next client message, or None when `timeout` passed or an `extra` future fired first."""
        if self._recv is None:
            self._recv = asyncio.ensure_future(self.ws.receive())
        waits = [self._recv, *extra]
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._recv in done:
            msg, self._recv = self._recv.result(), None
            return msg
        return None

    async def _send(self, obj: dict[str, Any]) -> None:
        if not self.ws.closed:
            try:
                await self.ws.send_str(json.dumps(obj))
            except (ConnectionError, RuntimeError):
                pass

    async def _close(self, code: int, message: str = "") -> None:
        if self._recv is not None:
            self._recv.cancel()
            self._recv = None
        if not self.ws.closed:
            try:
                await self.ws.close(code=code, message=message.encode()[:120])
            except (ConnectionError, RuntimeError):
                pass

    async def _refuse(self, err: SessionError) -> None:
        """An error before `ready`: no job exists, nothing to save."""
        self.svc.metrics.errors.labels(err.code.value).inc()
        self.log.info("session_refused", code=err.code.value, message=err.message)
        await self._send(err.frame())
        await self._close(CLOSE_CODES[err.code], err.code.value)

    # -- phases --------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            start = await self._await_start()
            self.start = start
            await self._admit(start)
        except SessionError as e:
            await self._refuse(e)
            return
        call = self.call
        assert call is not None
        with bind_job(call.id, session_id=call.session_id):
            try:
                await self._run_call(call, start)
            finally:
                self.svc.calls.remove(call)
                self.svc.calls.release(self.principal.owner)

    async def _await_start(self) -> StartConfig:
        t = self.limits.first_audio_timeout_s
        msg = await self._receive(t)
        if msg is None:
            raise SessionError(ErrorCode.IDLE_TIMEOUT, f"no start frame within {t:g} s of connecting")
        if msg.type == WSMsgType.BINARY:
            raise SessionError(ErrorCode.INVALID_CONFIG, "audio before start: send a start frame first")
        if msg.type != WSMsgType.TEXT:
            raise SessionError(ErrorCode.INVALID_CONFIG, "the connection closed before a start frame")
        return StartConfig.parse(
            _parse_text(msg.data), default_endpointing_ms=self.svc.config.recognizer.endpointing_ms,
            max_duration_s=self.limits.max_duration_s, multilingual=bool(getattr(self.svc.pool, "multilingual", False)),
            languages=self.svc.pool.languages)

    async def _admit(self, start: StartConfig) -> None:
        self.front = AudioFrontEnd(start.audio_format)
        self.call, self._sub = await admit_call(self.svc, self.principal.owner, start, source=JobSource.STREAM)

    async def _run_call(self, call: Call, start: StartConfig) -> None:
        ready = {"type": "ready", "job_id": call.id, "session_id": call.session_id,
                 "max_duration_seconds": start.max_duration_seconds, "config": start.effective()}
        if start.warnings:
            ready["warnings"] = list(start.warnings)
        await self._send(ready)
        call.log.info("session_ready", **{k: v for k, v in start.effective().items() if k != "metadata"})
        self._sender = asyncio.ensure_future(self._forward(start.interim_results))
        outcome: _Outcome | SessionError
        try:
            outcome = await self._loop(call)
        except Exception as e:  # noqa: BLE001 - any bug still ends the session cleanly, job saved
            if is_storage_full(e):
                outcome = failure_error(e)
            else:
                call.log.exception("session_crashed")
                outcome = SessionError(ErrorCode.INTERNAL, f"internal error: {type(e).__name__}")
        await self._conclude(call, outcome)

    async def _loop(self, call: Call) -> _Outcome | SessionError:
        assert self.front is not None and self.start is not None and call.failure is not None
        lim = self.limits
        t0 = time.monotonic()
        last_activity = t0
        got_audio = False
        max_input_s = self.start.max_duration_seconds
        # wall-clock guard: audio paced far slower than real time cannot hold a slot forever
        wall_limit = t0 + max_input_s + lim.idle_timeout_s
        stop = asyncio.ensure_future(call.stop_requested.wait())
        try:
            while True:
                now = time.monotonic()
                deadlines = [(last_activity + lim.idle_timeout_s, "idle"), (wall_limit, "wall")]
                if not got_audio:
                    deadlines.append((t0 + lim.first_audio_timeout_s, "first_audio"))
                deadline, which = min(deadlines)
                msg = await self._receive(max(0.0, deadline - now), stop, call.failure)
                if msg is None:
                    if stop.done():
                        return _Outcome.DRAIN
                    if call.failure.done():
                        return failure_error(call.failure.result())
                    if time.monotonic() < deadline:
                        continue
                    if which == "first_audio":
                        return SessionError(ErrorCode.IDLE_TIMEOUT,
                                            f"no audio within {lim.first_audio_timeout_s:g} s of ready")
                    if which == "wall":
                        return SessionError(ErrorCode.MAX_DURATION_REACHED,
                                            f"session open longer than {max_input_s:g} s of audio allows")
                    return SessionError(ErrorCode.IDLE_TIMEOUT,
                                        f"no audio or keep_alive for {lim.idle_timeout_s:g} s")
                if msg.type == WSMsgType.BINARY:
                    data: bytes = msg.data
                    if len(data) > lim.max_frame_bytes:
                        return SessionError(ErrorCode.INVALID_AUDIO,
                                            f"audio frame of {len(data)} bytes exceeds the {lim.max_frame_bytes}-byte limit")
                    if not data:
                        continue
                    last_activity = time.monotonic()
                    got_audio = True
                    fmt = self.start.audio_format
                    room = max_input_s - self.front.input_seconds
                    room_bytes = int(round(room * fmt.sample_rate)) * fmt.frame_bytes
                    over = len(data) >= room_bytes and len(data) % fmt.frame_bytes == 0
                    if over:
                        data = data[:room_bytes]
                    try:
                        chans = self.front.feed(data)
                    except InvalidAudio as e:
                        return SessionError(ErrorCode.INVALID_AUDIO, str(e))
                    call.feed(chans)
                    if call.failure.done():  # e.g. the disk filled while recording this frame
                        return failure_error(call.failure.result())
                    if over:
                        return SessionError(ErrorCode.MAX_DURATION_REACHED,
                                            f"the session reached its maximum of {max_input_s:g} s of audio")
                elif msg.type == WSMsgType.TEXT:
                    last_activity = time.monotonic()
                    try:
                        ctl = _parse_text(msg.data)
                        if apply_control(call, ctl):
                            return _Outcome.END
                    except SessionError as e:
                        return e
                elif msg.type == WSMsgType.ERROR and isinstance(self.ws.exception(), Exception):
                    exc = self.ws.exception()
                    if "size" in str(exc).lower():  # aiohttp refused a frame beyond max_msg_size
                        return SessionError(ErrorCode.INVALID_AUDIO, f"frame too large: {exc}")
                    return _Outcome.DISCONNECT
                else:  # CLOSE, CLOSING, CLOSED
                    return _Outcome.DISCONNECT
        finally:
            stop.cancel()

    async def _forward(self, interim: bool) -> None:
        """Bus -> socket for this job: partials (if asked), finals, usage. Ends when the sub closes."""
        async for env in self._sub:
            frame = wire_frame(env.event, interim)
            if frame is not None:
                await self._send(frame)

    async def _conclude(self, call: Call, outcome: _Outcome | SessionError) -> None:
        """Flush the audio, save the job, let every final out, then the last frame and the close."""
        err = outcome if isinstance(outcome, SessionError) else None
        status, error = job_ending(err)
        if self.front is not None:  # the resampler holds a few ms of received audio: transcribe it too
            try:
                call.feed(self.front.flush())
            except Exception:  # noqa: BLE001
                call.log.warning("resampler_flush_failed")
        try:
            job = await call.finish(status, error)
        except Exception as e:  # noqa: BLE001 - the client still gets an error frame before the close
            call.log.error("call_not_saved", error=repr(e))
            err = failure_error(e) if is_storage_full(e) else SessionError(
                ErrorCode.INTERNAL, f"the session could not be saved: {type(e).__name__}")
            job = call.job
        if err is None and call.storage_error is not None:  # the disk filled as the session ended
            err = failure_error(call.storage_error)
        try:
            await settle_call(self.svc, call)
        except Exception as e:  # noqa: BLE001
            call.log.error("usage_not_settled", error=repr(e))  # settled from the recording on restart
        self._sub.close()
        if self._sender is not None:
            await self._sender
        if err is not None:
            self.svc.metrics.errors.labels(err.code.value).inc()
            call.log.info("session_error", code=err.code.value, message=err.message)
            await self._send(err.frame())
            await self._close(CLOSE_CODES[err.code], err.code.value)
            return
        if outcome is _Outcome.DISCONNECT:
            call.log.info("client_disconnected", status=job.status.value)
            return
        await self._send(completed_frame(call, server_shutdown=outcome is _Outcome.DRAIN))
        if outcome is _Outcome.DRAIN:
            await self._close(CLOSE_GOING_AWAY, "server shutting down")
        else:
            await self._close(CLOSE_NORMAL)


# --------------------------------------------------------------------------- shared by every live ingress
# (the WebRTC ingress, bridge/ingress/webrtc.py, runs its sessions through these too)


def streamer_config(svc: "Service", start: StartConfig) -> StreamerConfig:
    """The recognizer settings of a session: the server's defaults with the start fields applied."""
    base = StreamerConfig(**svc.config.recognizer.streamer_kwargs())
    return replace(base, endpointing_ms=start.endpointing_ms, interim_results=start.interim_results,
                   language=start.language, word_boost=start.word_boost)


async def admit_call(svc: "Service", owner: str, start: StartConfig, *, source: JobSource,
                     config: dict[str, Any] | None = None) -> tuple[Call, Any]:
    """Session slot, credit reservation, then the opened Call and a bus subscription to its events.

    Raises SessionError (UPSTREAM_ERROR while draining, STORAGE_FULL while the data directory is
    under its free-space reserve, RATE_LIMITED for the key's session limit or the server's decode
    capacity (bridge/admission.py), INSUFFICIENT_CREDITS); each refusal undoes the steps before
    it, so a refused session leaves no job and no reservation.
    `config` is what the job records as its config (default: `start.effective()`)."""
    limit = svc.config.limits.max_sessions_per_key
    if svc.draining:
        raise SessionError(ErrorCode.UPSTREAM_ERROR, "the server is shutting down; retry on another node")
    refusal = svc.storage.refusal()
    if refusal is not None:
        raise SessionError(ErrorCode.STORAGE_FULL, refusal)
    if not svc.calls.admit(owner, limit):
        raise SessionError(ErrorCode.RATE_LIMITED,
                           f"{svc.calls.active(owner)} sessions already live for this key (limit {limit})")
    assert svc.admission is not None, "the service is not started"
    try:
        held = svc.admission.reserve(start.channels)
    except CapacityRefused as e:
        svc.calls.release(owner)
        svc.metrics.capacity_refused.labels(source.value).inc()
        raise SessionError.over_capacity(e) from None
    job_id = new_job_id()
    sub = None
    try:
        reserve = math.ceil(credits_for(start.max_duration_seconds, start.channels, svc.config.credits.per_minute))
        try:
            await svc.keys.reserve(owner, job_id, reserve)
        except InsufficientCredits as e:
            raise SessionError(
                ErrorCode.INSUFFICIENT_CREDITS,
                f"balance {e.balance} credits is short of the {e.needed} reserved for a session of up to "
                f"{start.max_duration_seconds:g} s x {start.channels} channel(s) at "
                f"{svc.config.credits.per_minute} credits/min; lower max_duration_seconds or add credits") from None
        job = Job(id=job_id, owner=owner, source=source, config=config if config is not None else start.effective(),
                  speakers=list(start.speakers), metadata=start.metadata)
        call = Call(job, store=svc.store, bus=svc.bus, pool=svc.pool, streamer_config=streamer_config(svc, start),
                    recordings_dir=svc.recordings_dir, credits_per_minute=svc.config.credits.per_minute,
                    usage_interval_s=svc.config.credits.usage_interval_s, storage=svc.storage)
        sub = svc.bus.subscribe(job_id)
        await call.open()
    except BaseException as e:
        full = is_storage_full(e)  # the disk filled between the check and the first write
        if full:
            svc.storage.exhaust(e)  # frees the emergency reserve: the settle below can commit
        held.release()
        svc.calls.release(owner)
        if sub is not None:
            sub.close()
        await svc.keys.settle(job_id, 0)
        if full:
            raise failure_error(e) from None
        raise
    svc.calls.add(call, owner)
    held.release()  # its legs now count as live
    svc.metrics.sessions.labels(source.value).inc()
    return call, sub


def apply_control(call: Call, ctl: dict[str, Any]) -> bool:
    """Apply a client control message; True when it ends the session (`end`).
    Raises SessionError(INVALID_CONFIG) for a bad value or an unknown type."""
    kind = ctl["type"]
    if kind == "keep_alive":
        return False
    if kind == "force_endpoint":
        call.force_endpoint()
        return False
    if kind == "configure":
        v = ctl.get("endpointing_ms")
        lo, hi = ENDPOINTING_RANGE
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise SessionError(ErrorCode.INVALID_CONFIG,
                               f"configure.endpointing_ms must be an integer in {lo}..{hi}, got {shown(v)}")
        call.configure(v)
        call.log.info("configured", endpointing_ms=v)
        return False
    if kind == "end":
        return True
    if kind == "start":
        raise SessionError(ErrorCode.INVALID_CONFIG, "start was already received; one start per session")
    raise SessionError(ErrorCode.INVALID_CONFIG,
                       f"unknown frame type {shown(kind)}; expected keep_alive, force_endpoint, configure or end")


def wire_frame(event: Any, interim: bool) -> dict[str, Any] | None:
    """A bus event as the client sees it (partials only if asked), or None for lifecycle events."""
    t = event.type
    if t in (EventType.CALL_STARTED, EventType.CALL_ENDED) or (t is EventType.PARTIAL and not interim):
        return None
    return event.to_dict()


def completed_frame(call: Call, *, server_shutdown: bool = False) -> dict[str, Any]:
    """`server_shutdown`: the server ended the session at its shutdown, before the client's `end`
    or `bye`, so the job holds only what arrived until then (a data channel has no close code)."""
    frame = {"type": "completed", "job_id": call.id, "streamed_seconds": round(call.streamed_seconds, 3),
             "credits_used": round(call.credits_used, 2),
             "transcript_path": f"/v1/jobs/{call.id}/transcript", "job_path": f"/v1/jobs/{call.id}"}
    if server_shutdown:
        frame["server_shutdown"] = True
    return frame


async def settle_call(svc: "Service", call: Call) -> None:
    """Charge what the finished session used (releasing the rest of its reservation) and count its audio."""
    await svc.keys.settle(call.id, math.ceil(call.credits_used))
    svc.metrics.audio_seconds.labels(call.job.source.value).inc(call.streamed_seconds * call.channels)


# --------------------------------------------------------------------------- route


async def stream_handler(request: web.Request) -> web.StreamResponse:
    from bridge.service import SERVICE

    svc: Service = request.app[SERVICE]
    if not svc.ready or svc.draining:
        return json_error(503, "UNAVAILABLE", "the server is starting or shutting down", retry_after_s=5)
    ws = web.WebSocketResponse(max_msg_size=4 * svc.config.limits.max_frame_bytes, heartbeat=30.0)
    upgrade = ws.can_prepare(request).ok
    # A plain GET never spends a single-use token: 401 for a bad credential, else 426.
    principal = await require_principal(request, allow_temp=True, spend_temp=upgrade)
    if not upgrade:
        resp = json_error(426, "UPGRADE_REQUIRED", f"{PATH} is a WebSocket: connect with a WebSocket client")
        resp.headers["Upgrade"] = "websocket"
        return resp
    session = StreamSession(svc, ws, principal)
    try:
        await ws.prepare(request)
        await session.run()
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001
        log.exception("stream_handler_failed")
        await session._close(CLOSE_CODES[ErrorCode.INTERNAL], "INTERNAL")
    finally:
        release_heartbeat(ws)
        if session.call is None and principal.token_hash is not None:
            # a temporary token is claimed at the upgrade; no session opened (refused start, or the
            # client left first), so it is given back for a retry
            await svc.keys.release_temp_token(principal.token_hash)
    return ws


def add_routes(app: web.Application) -> None:
    app.router.add_get(PATH, stream_handler)
