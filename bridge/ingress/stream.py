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
import time
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from aiohttp import WSMsgType, web

from bridge.api.http import json_error, release_heartbeat, require_principal, service_of
from bridge.audio.codecs import InvalidAudio
from bridge.audio.frontend import AudioFrontEnd
from bridge.auth import Principal
from bridge.calls import Call
from bridge.config import Config
from bridge.ingress.base import Unavailable
from bridge.jobs.model import JobSource
from bridge.logs import bind_job, get_logger
from bridge.sessions import (CLOSE_CODES, CLOSE_GOING_AWAY, CLOSE_NORMAL, STREAM_CONTROLS, ErrorCode, SessionError,
                             StartConfig, completed_frame, failure_error, ready_frame, streamer_config, wire_frame)
from bridge.storage import is_storage_full

if TYPE_CHECKING:
    from bridge.service import Service

__all__ = ["PATH", "StreamIngress", "StreamSession"]

log = get_logger("bridge.ingress.stream")
PATH = "/v1/transcription/stream"


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
                self.svc.sessions.leave(call)

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
            STREAM_CONTROLS.parse(msg.data), default_endpointing_ms=self.svc.config.recognizer.endpointing_ms,
            max_duration_s=self.limits.max_duration_s, multilingual=bool(getattr(self.svc.pool, "multilingual", False)),
            languages=self.svc.pool.languages)

    async def _admit(self, start: StartConfig) -> None:
        self.front = AudioFrontEnd(start.audio_format)
        gate = self.svc.sessions
        ticket = await gate.admit(self.principal.owner, start.channels, start.max_duration_seconds, JobSource.STREAM)
        call = gate.new_call(ticket, config=start.effective(), speakers=list(start.speakers), metadata=start.metadata,
                             streamer=streamer_config(self.svc.config.recognizer.streamer_kwargs(), start))
        self._sub = await gate.open(ticket, call)
        self.call = call

    async def _run_call(self, call: Call, start: StartConfig) -> None:
        await self._send(ready_frame(call, start, start.effective()))
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
                        ctl = STREAM_CONTROLS.parse(msg.data)
                        if STREAM_CONTROLS.apply(call, ctl):
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
        if self.front is not None:  # the resampler holds a few ms of received audio: transcribe it too
            try:
                call.feed(self.front.flush())
            except Exception:  # noqa: BLE001
                call.log.warning("resampler_flush_failed")
        err = await self.svc.sessions.conclude(call, err)
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
            call.log.info("client_disconnected", status=call.job.status.value)
            return
        await self._send(completed_frame(call, server_shutdown=outcome is _Outcome.DRAIN))
        if outcome is _Outcome.DRAIN:
            await self._close(CLOSE_GOING_AWAY, "server shutting down")
        else:
            await self._close(CLOSE_NORMAL)


# --------------------------------------------------------------------------- route


async def stream_handler(request: web.Request) -> web.StreamResponse:
    svc = service_of(request)
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


class StreamIngress:
    """The ingest socket as an ingress (bridge/ingress/base.py). Its sessions end at a drain through
    their calls (`Call.stop_requested`), so it holds nothing of its own to start or stop."""

    source: ClassVar[JobSource] = JobSource.STREAM

    def __init__(self, service: "Service") -> None:
        self.svc = service

    @staticmethod
    def enabled(config: Config) -> bool:
        return True

    @staticmethod
    def unavailable() -> Unavailable | None:
        return None

    @staticmethod
    def routes() -> list[web.RouteDef]:
        return [web.get(PATH, stream_handler)]

    async def start(self) -> None:
        pass

    async def drain(self, timeout_s: float) -> None:
        pass

    async def stop(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"live": sum(1 for c in self.svc.calls.calls.values() if c.job.source is JobSource.STREAM)}
