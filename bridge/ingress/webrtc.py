"""WebRTC ingress: `POST /v1/webrtc/offer` and the peer connections it answers (aiortc).

Signaling is one HTTP round trip with no trickle ICE: the browser's complete offer (audio, and an
ordered data channel "events") comes in, the complete answer (recvonly, host candidates, and any
configured STUN/TURN candidates) goes back, and the job exists from then on. The first audio track
is the `caller` leg: Opus frames arrive as 48 kHz av.AudioFrames, are mixed to mono, resampled
to 16 kHz by a stateful soxr stream and fed to the Call like any other ingress's PCM.

The "events" channel carries the ingest socket's frames for this job (`ready`, `partial`,
`final`, `usage`, then `completed` or `error`) and takes the browser's `bye`, `force_endpoint`,
`configure` and `keep_alive`. A call ends on `bye`, on the peer connection closing or failing,
when media stops for `webrtc.media_timeout_s`, when it never connects within
`webrtc.connect_timeout_s`, at the maximum duration, or on drain; every ending saves the job with
what was received. Admission, credits, frames, controls and settlement are the session layer's
(bridge/sessions/), as for the stream socket, so the two ingresses cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import replace
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

import av
import numpy as np
from aiohttp import web
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from bridge.api.http import json_error, require_principal, service_of
from bridge.audio.resample import StreamResampler
from bridge.auth import Principal
from bridge.calls import Call
from bridge.ice import allow_loopback_candidates
from bridge.config import Config
from bridge.ingress.base import Unavailable
from bridge.jobs.model import JobSource
from bridge.json_input import JsonInputError, parse_json
from bridge.logs import bind_job, get_logger
from bridge.recognizer.streamer import SAMPLE_RATE
from bridge.sessions import (HTTP_STATUS, ControlChannel, ErrorCode, SessionError, StartConfig, completed_frame,
                             failure_error, ready_frame, shown, streamer_config, wire_frame)

if TYPE_CHECKING:
    from bridge.config import WebRtcConfig
    from bridge.service import Service

__all__ = ["OFFER_PATH", "WebRtcIngress", "WebRtcSession"]

log = get_logger("bridge.ingress.webrtc")
OFFER_PATH = "/v1/webrtc/offer"
EVENTS_LABEL = "events"
SPEAKER = "caller"
MAX_SDP_BYTES = 64 * 1024
# start fields that describe a raw PCM wire; WebRTC audio is always Opus at 48 kHz
_WIRE_FIELDS = ("sample_rate", "channels", "encoding")
# the browser's controls on the events channel: the stream's, with `bye` (or `end`) ending the call
CONTROLS = ControlChannel(message="events channel message", kind="message", ends=("bye", "end"),
                          not_object='a message must be a JSON object with a string "type"',
                          expected="bye, force_endpoint, configure or keep_alive", second_start=False)
FLUSH_TIMEOUT_S = 2.0  # how long the last data channel messages get to be acknowledged before the close
# After `bye`, audio sent before it may still be on its way: aiortc's audio jitter buffer holds the
# last 4 packets (80 ms) until later ones push them out, and RTP and the data channel race. The
# microphone keeps sending, so a short grace lets every word spoken before `bye` in.
BYE_GRACE_S = 0.3


class Ending(Enum):
    BYE = "bye"  # the browser said bye
    HANGUP = "hangup"  # peer connection closed or failed, or the track ended
    MEDIA_TIMEOUT = "media_timeout"  # audio stopped (after the first frame)
    NO_CONNECTION = "no_connection"  # nothing within connect_timeout_s
    DRAIN = "drain"  # the service is shutting down


# --------------------------------------------------------------------------- the offer


def parse_offer(body: Any, svc: "Service") -> tuple[str, StartConfig]:
    """Validate the offer's JSON: (sdp, start config). Raises SessionError(INVALID_CONFIG)."""

    def bad(message: str) -> SessionError:
        return SessionError(ErrorCode.INVALID_CONFIG, message)

    if not isinstance(body, dict):
        raise bad('the body must be a JSON object {"sdp": "...", "type": "offer", "config": {...}}')
    if body.get("type", "offer") != "offer":
        raise bad(f'type must be "offer", got {shown(body.get("type"))}')
    sdp = body.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise bad("sdp must be the offer's SDP text (RTCPeerConnection.localDescription.sdp)")
    if len(sdp) > MAX_SDP_BYTES:
        raise bad(f"sdp is over {MAX_SDP_BYTES} bytes")
    lines = [ln.strip() for ln in sdp.strip().splitlines()]
    if lines[0] != "v=0":
        raise bad('sdp is not SDP: it must start with "v=0"')
    if not any(ln.startswith("m=audio ") for ln in lines):
        raise bad("the offer has no audio (no m=audio line): add the microphone track before createOffer")
    config = body.get("config")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise bad("config must be a JSON object of stream start fields")
    wire = [k for k in _WIRE_FIELDS if k in config]
    if wire:
        raise bad(f"{', '.join(wire)} cannot be set for WebRTC: the browser sends Opus at 48 kHz "
                  f"(allowed: language, endpointing_ms, interim_results, word_boost, metadata, max_duration_seconds)")
    if "type" in config:
        raise bad("config takes the start fields only, without type")
    meta = config.get("metadata")
    speakers = meta.get("speakers") if isinstance(meta, dict) else None
    start = StartConfig.parse(
        {"type": "start", **config}, default_endpointing_ms=svc.config.recognizer.endpointing_ms,
        max_duration_s=svc.config.limits.max_duration_s, multilingual=bool(getattr(svc.pool, "multilingual", False)),
        languages=svc.pool.languages)
    if speakers is None:  # one leg, the browser's microphone
        start = replace(start, speakers=(SPEAKER,))
    return sdp, start


def effective_config(start: StartConfig) -> dict[str, Any]:
    """`ready`'s config: the stream's, with the wire fields as they are on WebRTC."""
    eff = {k: v for k, v in start.effective().items() if k not in _WIRE_FIELDS}
    return {**eff, "codec": "opus", "max_duration_seconds": start.max_duration_seconds}


# --------------------------------------------------------------------------- audio


class AudioIn:
    """Received av.AudioFrames -> 16 kHz int16 mono, statefully resampled, with a duration cap.

    `input_seconds` counts audio received at the source rate; `take(frame, limit_s)` returns the
    16 kHz PCM of the part of the frame within `limit_s` and whether the limit was reached."""

    def __init__(self) -> None:
        self.rate = 0
        self.resampler: StreamResampler | None = None
        self.input_seconds = 0.0
        self._converter: av.AudioResampler | None = None

    def _mono(self, frame: av.AudioFrame) -> np.ndarray:
        if frame.format.name == "s16" and frame.format.is_packed:
            a = frame.to_ndarray().reshape(-1)  # (1, samples * channels), interleaved
            ch = len(frame.layout.channels)
            if ch == 1:
                return a.astype(np.int16, copy=False)
            a = a[: len(a) // ch * ch].reshape(-1, ch).astype(np.int32)
            return (a.sum(axis=1) // ch).astype(np.int16)
        if self._converter is None:  # any other decoder output: let libswresample do it
            self._converter = av.AudioResampler(format="s16", layout="mono", rate=frame.sample_rate)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in self._converter.resample(frame)] or
                              [np.zeros(0, np.int16)]).astype(np.int16)

    def take(self, frame: av.AudioFrame, limit_s: float) -> tuple[np.ndarray, bool]:
        out: list[np.ndarray] = []
        if frame.sample_rate != self.rate:
            if self.resampler is not None:
                out.append(self.resampler.flush())
            self.rate = frame.sample_rate
            self.resampler = StreamResampler(self.rate, SAMPLE_RATE)
            self._converter = None
        assert self.resampler is not None
        mono = self._mono(frame)
        room = int(round((limit_s - self.input_seconds) * self.rate))
        over = len(mono) >= room
        if over:
            mono = mono[: max(0, room)]
        self.input_seconds += len(mono) / self.rate
        out.append(self.resampler.process(mono))
        return (np.concatenate(out) if len(out) > 1 else out[0]), over

    def flush(self) -> np.ndarray:
        return self.resampler.flush() if self.resampler is not None else np.zeros(0, np.int16)


# --------------------------------------------------------------------------- one call


class WebRtcSession:
    """One peer connection from offer to close, and the job it feeds."""

    def __init__(self, ingress: "WebRtcIngress", principal: Principal, start: StartConfig) -> None:
        self.ingress = ingress
        self.svc = ingress.svc
        self.cfg: WebRtcConfig = ingress.cfg
        self.principal = principal
        self.start = start
        self.pc = RTCPeerConnection(ingress.rtc_configuration())
        self.call: Call | None = None
        self.sub: Any = None
        self.track: MediaStreamTrack | None = None  # the caller leg
        self.transceiver: Any = None
        self.channel: Any = None
        self.audio = AudioIn()
        self.task: asyncio.Task | None = None
        self.frames = 0
        self._pump_stop = False
        self._ending: asyncio.Future[Ending | SessionError] = asyncio.get_running_loop().create_future()
        self._ready_sent = asyncio.Event()
        self._concluding = False
        self.log = log.bind(owner=principal.owner)
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)
        self.pc.on("iceconnectionstatechange", self._on_ice_state)

    # -- signaling -----------------------------------------------------------------------------
    async def accept(self, sdp: str) -> None:
        """Apply the offer (SessionError INVALID_CONFIG if aiortc refuses it or it sends no audio)."""
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as e:  # noqa: BLE001 - aiortc raises ValueError, OperationError, ... on bad SDP
            raise SessionError(ErrorCode.INVALID_CONFIG, f"the offer SDP was refused: {type(e).__name__}: {e}") from None
        if self.track is None:
            raise SessionError(ErrorCode.INVALID_CONFIG, "the offer sends no audio: the audio m-line must be "
                                                         "sendrecv or sendonly (add the microphone track)")

    async def answer(self, call: Call, sub: Any) -> RTCSessionDescription:
        """Receive-only answer: the first audio track is transcribed; other media is declined
        (inactive), so nothing is decoded for it and nothing is sent back."""
        self.call, self.sub = call, sub
        for t in self.pc.getTransceivers():
            t.direction = "recvonly" if t is self.transceiver else "inactive"
        await self.pc.setLocalDescription(await self.pc.createAnswer())  # gathers candidates: no trickle
        return self.pc.localDescription

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self.track is None:
            self.track = track
            self.transceiver = next((t for t in self.pc.getTransceivers() if t.receiver.track is track), None)
        else:
            self.log.info("webrtc_track_ignored", kind=track.kind)

    def _on_datachannel(self, channel: Any) -> None:
        if channel.label != EVENTS_LABEL or self.channel is not None:
            self.log.info("webrtc_channel_ignored", label=channel.label)
            return
        self.channel = channel
        channel.on("message", self._on_message)
        if channel.readyState == "open":
            self._send_ready()
        else:
            channel.on("open", self._send_ready)

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if self.call is not None:
            self.call.log.info("webrtc_connection_state", state=state)
        if state in ("failed", "closed"):
            self._end(Ending.HANGUP)

    def _on_ice_state(self) -> None:
        if self.pc.iceConnectionState == "failed":
            self._end(Ending.HANGUP)

    # -- events channel ------------------------------------------------------------------------
    def _send(self, obj: dict[str, Any]) -> None:
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            try:
                ch.send(json.dumps(obj))
            except Exception as e:  # noqa: BLE001 - a closing transport must not break the call
                self.log.debug("webrtc_send_failed", error=repr(e))

    def _send_ready(self) -> None:
        call = self.call
        if call is None or self._concluding or self._ready_sent.is_set():
            return
        self._send(ready_frame(call, self.start, effective_config(self.start)))
        self._ready_sent.set()  # the forwarder starts after this, so `ready` is always first
        call.log.info("webrtc_events_open")

    def _on_message(self, data: str | bytes) -> None:
        if self.call is None:
            return
        try:
            if CONTROLS.apply(self.call, CONTROLS.parse(data)):
                self._end(Ending.BYE)
        except SessionError as e:
            self._end(e)

    async def _forward(self) -> None:
        """Bus -> events channel for this job, once `ready` is out (or never, if no channel opened)."""
        await self._ready_sent.wait()
        async for env in self.sub:
            frame = wire_frame(env.event, self.start.interim_results)
            if frame is not None:
                self._send(frame)

    async def _flush_channel(self) -> None:
        """Wait (bounded) until everything sent on the channel is acknowledged by the browser.
        Closing the peer connection aborts the SCTP association at once (aiortc sends ABORT), which
        would drop a `completed` still queued; aiortc has no "all sent" signal, so look at its queues."""
        ch = self.channel
        if ch is None or ch.readyState != "open":
            return
        sctp = ch.transport
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while time.monotonic() < deadline:
            pending = (ch.bufferedAmount or len(getattr(sctp, "_data_channel_queue", ()))
                       or len(getattr(sctp, "_outbound_queue", ())) or len(getattr(sctp, "_sent_queue", ())))
            if not pending or ch.readyState != "open":
                return
            await asyncio.sleep(0.01)

    # -- media ---------------------------------------------------------------------------------
    async def _pump(self) -> None:
        """Caller audio -> the Call, until the track ends, media stops, the duration cap, or the
        session stops it (`_pump_stop`: a flag as well as a cancel, because on Python 3.11
        `asyncio.wait_for` can swallow a cancel that lands as the frame arrives)."""
        call, track = self.call, self.track
        assert call is not None and track is not None
        limit = self.start.max_duration_seconds
        first_deadline = time.monotonic() + self.cfg.connect_timeout_s
        while not self._pump_stop:
            timeout = max(0.0, first_deadline - time.monotonic()) if not self.frames else self.cfg.media_timeout_s
            try:
                async with asyncio.timeout(timeout):
                    frame = await track.recv()
            except TimeoutError:
                self._end(Ending.MEDIA_TIMEOUT if self.frames else Ending.NO_CONNECTION)
                return
            except MediaStreamError:
                self._end(Ending.HANGUP)
                return
            if self._pump_stop:
                return
            if not self.frames:
                call.log.info("webrtc_media_started", rate=frame.sample_rate, layout=frame.layout.name)
            self.frames += 1
            pcm, over = self.audio.take(frame, limit)
            call.feed_leg(0, pcm)
            if over:
                self._end(SessionError(ErrorCode.MAX_DURATION_REACHED,
                                       f"the call reached its maximum of {limit:g} s of audio"))
                return

    def _end(self, how: Ending | SessionError) -> None:
        """The first reason to end wins; the run task does the rest."""
        if not self._ending.done():
            self._ending.set_result(how)

    def request_end(self, how: Ending = Ending.DRAIN) -> None:
        self._end(how)

    # -- lifecycle -----------------------------------------------------------------------------
    async def run(self) -> None:
        call = self.call
        assert call is not None and call.failure is not None
        forwarder = asyncio.ensure_future(self._forward())
        pump = asyncio.ensure_future(self._pump())
        pump.add_done_callback(self._pump_done)
        stop = asyncio.ensure_future(call.stop_requested.wait())
        # wall-clock guard: audio arriving far slower than real time cannot hold a slot forever
        wall = self.start.max_duration_seconds + self.cfg.connect_timeout_s + self.cfg.media_timeout_s
        try:
            done, _ = await asyncio.wait([self._ending, stop, call.failure], timeout=wall,
                                         return_when=asyncio.FIRST_COMPLETED)
            outcome: Ending | SessionError
            if self._ending.done():
                outcome = self._ending.result()
            elif stop in done:
                outcome = Ending.DRAIN
            elif call.failure.done():
                outcome = failure_error(call.failure.result())
            else:
                outcome = SessionError(ErrorCode.MAX_DURATION_REACHED,
                                       f"call open longer than {self.start.max_duration_seconds:g} s of audio allows")
            if outcome is Ending.BYE and not pump.done():
                await asyncio.wait([pump], timeout=BYE_GRACE_S)
            self._pump_stop = True
            pump.cancel()
            await asyncio.wait([pump], timeout=5)
            await self._stop_media()
            await self._conclude(call, outcome, forwarder)
        finally:
            for t in (stop, pump, forwarder):
                t.cancel()
            with contextlib.suppress(Exception):
                await self.pc.close()
            self.svc.sessions.leave(call)

    async def _stop_media(self) -> None:
        """Stop receiving audio once nothing reads it. Until the peer connection closes, aiortc
        decodes whatever the caller still sends into the track's unbounded queue, and concluding
        (the last finals, settlement, the channel flush) takes seconds under load: those frames
        piled up unread, 50 a second of it, and stayed resident with the session's reference
        cycles until a full garbage collection (tests/test_memory.py; docs/benchmarks.md,
        "Memory"). Stopping the transceiver (idempotent; the close stops it again) stops the
        decoder thread and drops the caller's RTP; the events channel stays open."""
        if self.transceiver is not None:
            with contextlib.suppress(Exception):
                await self.transceiver.stop()

    def _pump_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            if self.call is not None:
                self.call.log.error("webrtc_audio_failed", error=repr(task.exception()))
            self._end(SessionError(ErrorCode.INTERNAL, f"receiving audio failed: {type(task.exception()).__name__}"))

    async def _conclude(self, call: Call, outcome: Ending | SessionError, forwarder: asyncio.Future) -> None:
        """Flush the audio, save the job, let every final out, then the last message and the close."""
        self._concluding = True
        err = outcome if isinstance(outcome, SessionError) else None
        with contextlib.suppress(Exception):  # the resampler holds a few ms of received audio
            call.feed_leg(0, self.audio.flush())
        ended_by = err.code.value if err else outcome.value
        with contextlib.suppress(Exception):
            await call.annotate(ended_by=ended_by)
        err = await self.svc.sessions.conclude(call, err)
        self.sub.close()
        if self._ready_sent.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(forwarder), 10)
        if err is not None:
            self.svc.metrics.errors.labels(err.code.value).inc()
            self._send(err.frame())
        else:
            self._send(completed_frame(call, server_shutdown=outcome is Ending.DRAIN))
        await self._flush_channel()
        call.log.info("webrtc_call_ended", ended_by=ended_by, status=call.job.status.value, frames=self.frames,
                      streamed_seconds=round(call.streamed_seconds, 3))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.pc.close()


# --------------------------------------------------------------------------- the manager


class WebRtcIngress:
    """Every live peer connection of the service, keyed by job id; `close()` ends them all.
    An ingress (bridge/ingress/base.py): its calls end at a drain through `Call.stop_requested`."""

    source: ClassVar[JobSource] = JobSource.WEBRTC

    def __init__(self, service: "Service") -> None:
        self.svc = service
        self.cfg: WebRtcConfig = service.config.webrtc
        self.sessions: dict[str, WebRtcSession] = {}
        self.closing = False
        if self.cfg.loopback_candidates:
            # aioice leaves 127.0.0.1 out of the host candidates and has no option to keep it;
            # without it a browser on this machine (or in a namespace with only lo) cannot
            # connect. This wraps aioice.ice.get_host_addresses for the whole process.
            allow_loopback_candidates()

    @staticmethod
    def enabled(config: Config) -> bool:
        return config.webrtc.enabled

    @staticmethod
    def unavailable() -> Unavailable | None:
        return None

    @staticmethod
    def routes() -> list[web.RouteDef]:
        return [web.post(OFFER_PATH, offer_handler)]

    async def start(self) -> None:
        pass

    async def drain(self, timeout_s: float) -> None:
        pass

    async def stop(self) -> None:
        await self.close()

    def stats(self) -> dict[str, Any]:
        return {"calls": len(self.sessions)}

    def rtc_configuration(self) -> RTCConfiguration:
        """Only the configured STUN/TURN servers: with none, aiortc must not fall back to its
        public default STUN server (a service in a closed network should not call out)."""
        servers = []
        for url in self.cfg.ice_servers:
            if url.startswith(("turn:", "turns:")):
                servers.append(RTCIceServer(urls=url, username=self.cfg.turn_username or None,
                                            credential=self.cfg.turn_credential or None))
            else:
                servers.append(RTCIceServer(urls=url))
        return RTCConfiguration(iceServers=servers)

    async def offer(self, principal: Principal, sdp: str, start: StartConfig) -> dict[str, Any]:
        """Answer an offer: the call is live when this returns. Raises SessionError."""
        if self.closing:
            raise SessionError(ErrorCode.UPSTREAM_ERROR, "the server is shutting down; retry on another node")
        session = WebRtcSession(self, principal, start)
        try:
            await session.accept(sdp)
            gate = self.svc.sessions
            ticket = await gate.admit(principal.owner, start.channels, start.max_duration_seconds, JobSource.WEBRTC)
            call = gate.new_call(ticket, config=effective_config(start), speakers=list(start.speakers),
                                 metadata=start.metadata,
                                 streamer=streamer_config(self.svc.config.recognizer.streamer_kwargs(), start))
            sub = await gate.open(ticket, call)
        except BaseException:
            await session.close()
            raise
        with bind_job(call.id, session_id=call.session_id):
            try:
                answer = await session.answer(call, sub)
            except Exception as e:  # noqa: BLE001 - the job exists: end it, saved as failed
                call.log.exception("webrtc_answer_failed")
                session._end(SessionError(ErrorCode.INTERNAL, f"could not answer the offer: {type(e).__name__}"))
                session.task = asyncio.ensure_future(session.run())
                await session.task
                raise SessionError(ErrorCode.INTERNAL, f"could not answer the offer: {type(e).__name__}: {e}") from None
            self.sessions[call.id] = session
            session.task = asyncio.ensure_future(session.run())  # inherits the job's log binding
            session.task.add_done_callback(lambda _t, jid=call.id: self.sessions.pop(jid, None))
            call.log.info("webrtc_call_answered", source=JobSource.WEBRTC.value,
                          **{k: v for k, v in effective_config(start).items() if k != "metadata"})
        return {"sdp": answer.sdp, "type": answer.type, "job_id": call.id, "session_id": call.session_id,
                "max_duration_seconds": start.max_duration_seconds, "config": effective_config(start),
                **({"warnings": list(start.warnings)} if start.warnings else {})}

    async def close(self, timeout_s: float = 10.0) -> None:
        """Service stop: end every call (saved, `completed` sent), then close what is left."""
        self.closing = True
        sessions = list(self.sessions.values())
        for s in sessions:
            s.request_end(Ending.DRAIN)
        tasks = [s.task for s in sessions if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        for s in sessions:
            if s.task is not None and not s.task.done():
                s.task.cancel()
            await s.close()
        if sessions:
            log.info("webrtc_closed", calls=len(sessions))


# --------------------------------------------------------------------------- route


async def offer_handler(request: web.Request) -> web.StreamResponse:
    svc = service_of(request)
    ingress = svc.ingress(JobSource.WEBRTC)
    if not svc.config.webrtc.enabled:
        return json_error(404, "NOT_FOUND", "WebRTC is disabled on this server (webrtc.enabled = false)")
    if not svc.ready or svc.draining or not isinstance(ingress, WebRtcIngress) or ingress.closing:
        return json_error(503, "UNAVAILABLE", "the server is starting or shutting down", retry_after_s=5)
    # checked first without spending a single-use token: a malformed offer does not burn it
    principal = await require_principal(request, allow_temp=True, spend_temp=False)
    try:
        refusal = svc.storage.refusal()  # before the SDP work and before a single-use token is spent
        if refusal is not None:
            raise SessionError(ErrorCode.STORAGE_FULL, refusal)
        try:
            body = parse_json(await request.read())
        except JsonInputError as e:
            raise SessionError(ErrorCode.INVALID_CONFIG,
                               f'the body must be JSON {{"sdp": "...", "type": "offer", "config": {{...}}}}: {e}') from None
        sdp, start = parse_offer(body, svc)
        if principal.kind == "temp_token":
            # claimed now (401 if a concurrent request got it first), given back below if no call opens
            principal = await require_principal(request, allow_temp=True, spend_temp=True)
        try:
            return web.json_response(await ingress.offer(principal, sdp, start))
        except BaseException:
            if principal.token_hash is not None:  # SDP refused, rate limit, credits...: no call, token kept
                await svc.keys.release_temp_token(principal.token_hash)
            raise
    except SessionError as e:
        svc.metrics.errors.labels(e.code.value).inc()
        log.info("webrtc_offer_refused", owner=principal.owner, code=e.code.value, message=e.message)
        resp = json_error(e.http_status or HTTP_STATUS.get(e.code, 400), e.code.value, e.message,
                          **({"retry_after_s": e.retry_after_s} if e.retry_after_s is not None else {}))
        if e.retry_after_s is not None:
            resp.headers["Retry-After"] = str(e.retry_after_s)
        return resp
