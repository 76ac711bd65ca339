"""WebRTC client: a call from Python that looks to the server exactly like a browser's.

    async with WebRtcClient(url, api_key=KEY, wav="call.wav", config={"endpointing_ms": 500}) as c:
        async def hang_up():
            await c.wait_played()              # the whole WAV has been sent
            await c.bye()                      # flush, finalize, save, then `completed`
        ender = asyncio.create_task(hang_up())
        async for ev in c:                     # dicts: the server's "events" data channel messages
            if ev["type"] == "final":
                print(ev["text"])

It offers Opus audio plus an ordered data channel "events" (as docs/stream-protocol.md
asks of browsers), POSTs the offer to /v1/webrtc/offer, plays the WAV at real time from a
MediaStreamTrack paced like a microphone (20 ms frames at 48 kHz), and yields every message the
server sends (`ready` first, then `partial`/`final`/`usage`, then `completed` or `error`).
Iteration ends after `completed`/`error` or when the connection closes.

Run `callbridge webrtc FILE.wav --url URL --api-key KEY [--json]` to print finals (bridge/commands/webrtc.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import ipaddress
import json
import time
import wave
from pathlib import Path
from typing import Any, AsyncIterator, Literal
from urllib.parse import urlsplit

import aiohttp
import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

from bridge.ice import allow_loopback_candidates

from .controls import SessionControls
from .errors import ApiError

__all__ = ["OFFER_PATH", "WavTrack", "WebRtcClient", "WebRtcError", "read_wav_48k"]

OFFER_PATH = "/v1/webrtc/offer"
RATE = 48000  # what WebRTC audio runs at (Opus)
FRAME = 960  # 20 ms, a browser's packetization


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_wav_48k(path: str | Path) -> np.ndarray:
    """A 16-bit PCM WAV (any rate, mono or stereo) as int16 mono at 48 kHz, as a microphone gives it."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: {8 * w.getsampwidth()}-bit WAV; only 16-bit PCM is read")
        rate, channels = w.getframerate(), w.getnchannels()
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.int16)
    return to_48k_mono(pcm, rate, channels)


def to_48k_mono(pcm: np.ndarray, rate: int, channels: int = 1) -> np.ndarray:
    import soxr

    x = np.asarray(pcm, np.int16)
    if channels > 1:
        x = x[: len(x) // channels * channels].reshape(-1, channels).mean(axis=1)
    x = x.astype(np.float32) / 32768.0
    if rate != RATE:
        x = soxr.resample(x, rate, RATE, quality="HQ")
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)


class WavTrack(MediaStreamTrack):
    """Audio from memory, paced in real time like a microphone: 20 ms mono s16 frames at 48 kHz.

    The clock starts at the first frame aiortc asks for (when media is up), kept in `started_at`
    (time.monotonic()), so "spoken at t seconds into the file" is `started_at + t`. After the
    audio, `then="silence"` goes on sending silence as an open microphone does (the call ends by
    `bye`), `then="end"` ends the track so the server stops receiving media."""

    kind = "audio"

    def __init__(self, pcm48: np.ndarray, *, then: Literal["silence", "end"] = "silence") -> None:
        super().__init__()
        self.pcm = np.asarray(pcm48, np.int16)
        self.then = then
        self.started_at: float | None = None
        self.started = asyncio.Event()
        self.played = asyncio.Event()  # every sample of the audio has been handed to the encoder
        self._pts = 0

    @property
    def seconds(self) -> float:
        return len(self.pcm) / RATE

    @property
    def sent_seconds(self) -> float:
        """How much of the audio has been handed to the encoder so far."""
        return min(self._pts, len(self.pcm)) / RATE

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.started_at is None:
            self.started_at = time.monotonic()
            self.started.set()
        else:
            wait = self.started_at + self._pts / RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        chunk = self.pcm[self._pts : self._pts + FRAME]
        if len(chunk) < FRAME:
            if self._pts >= len(self.pcm):
                self.played.set()
                if self.then == "end":
                    self.stop()
                    raise MediaStreamError
            chunk = np.concatenate([chunk, np.zeros(FRAME - len(chunk), np.int16)])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        self._pts += FRAME
        return frame


class WebRtcError(Exception):
    """The server ended the call with an `error` message on the events channel."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class WebRtcClient(SessionControls):
    """One browser-like call. `wav` (a path) or `audio` (int16 mono at `sample_rate`) is what is said.

    `config` holds the stream start fields (language, endpointing_ms, interim_results, word_boost,
    metadata, max_duration_seconds). `ice_servers` are STUN/TURN URLs; none by default, so nothing
    leaves the network unless asked. Attributes after entering: `ready`, `answer` (the POST's JSON),
    `job_id`, `track` (its `started_at` and `played`), and at the end `completed` or `error`."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        token: str | None = None,
        wav: str | Path | None = None,
        audio: np.ndarray | None = None,
        sample_rate: int = 16000,
        config: dict[str, Any] | None = None,
        then: Literal["silence", "end"] = "silence",
        ice_servers: list[str] | None = None,
        connect_timeout_s: float = 30.0,
    ) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
        self.base_url = f"{scheme}://{parts.netloc}"
        self.host = parts.hostname or ""
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._params = {"token": token} if token else {}
        if wav is not None:
            pcm48 = read_wav_48k(wav)
        elif audio is not None:
            pcm48 = to_48k_mono(audio, sample_rate)
        else:
            raise ValueError("give the audio to send: wav=PATH or audio=int16 array")
        self.track = WavTrack(pcm48, then=then)
        self.config = dict(config or {})
        self.ice_servers = list(ice_servers or [])
        self.connect_timeout_s = connect_timeout_s
        self.pc: RTCPeerConnection | None = None
        self.channel: RTCDataChannel | None = None
        self.answer: dict[str, Any] | None = None
        self.ready: dict[str, Any] | None = None
        self.completed: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self._messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._bye_sent = False
        self._done = False

    @property
    def job_id(self) -> str | None:
        return self.answer["job_id"] if self.answer else None

    @property
    def played(self) -> asyncio.Event:
        return self.track.played

    @property
    def cut_short(self) -> bool:
        """The server ended the call at its shutdown, before our `bye` (`completed.server_shutdown`):
        the job holds only the audio that arrived until then."""
        return bool((self.completed or {}).get("server_shutdown"))

    # -- setup ---------------------------------------------------------------------------------
    async def __aenter__(self) -> "WebRtcClient":
        try:
            await self.connect()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def connect(self) -> None:
        """Offer, POST, answer, then wait for `ready` (raises WebRtcError/ApiError/TimeoutError)."""
        if _is_loopback_host(self.host):
            allow_loopback_candidates()
        servers = [RTCIceServer(urls=u) for u in self.ice_servers]
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))  # [] = no public STUN default
        self.channel = pc.createDataChannel("events", ordered=True)  # before the offer, as a browser does
        self.channel.on("message", self._on_message)
        self.channel.on("close", lambda: self._messages.put_nowait(None))
        pc.on("connectionstatechange", self._on_state)
        pc.addTrack(self.track)  # sendrecv, like getUserMedia + addTrack; the server answers recvonly
        await pc.setLocalDescription(await pc.createOffer())  # waits for host candidates: no trickle
        body = {"sdp": pc.localDescription.sdp, "type": "offer", "config": self.config}
        timeout = aiohttp.ClientTimeout(total=self.connect_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.post(self.base_url + OFFER_PATH, json=body, headers=self._headers,
                                 params=self._params) as r:
                text = await r.text()
                try:
                    data = json.loads(text)
                except json.JSONDecodeError:
                    data = None
                if r.status != 200 or not isinstance(data, dict) or "sdp" not in data:
                    raise ApiError.from_body(r.status, data, text)
        self.answer = data
        await pc.setRemoteDescription(RTCSessionDescription(sdp=data["sdp"], type=data["type"]))
        first = await asyncio.wait_for(self._messages.get(), self.connect_timeout_s)
        if first is None or first.get("type") != "ready":
            if first and first.get("type") == "error":
                raise WebRtcError(first.get("code", "?"), first.get("message", ""))
            raise WebRtcError("PROTOCOL", f"expected ready first, got {first!r}")
        self.ready = first

    def _on_message(self, data: str | bytes) -> None:
        try:
            msg = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        if isinstance(msg, dict):
            self._messages.put_nowait(msg)

    def _on_state(self) -> None:
        if self.pc is not None and self.pc.connectionState in ("failed", "closed"):
            self._messages.put_nowait(None)

    # -- sending -------------------------------------------------------------------------------
    async def send_json(self, obj: dict[str, Any]) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(json.dumps(obj))

    async def bye(self) -> None:
        """End the call: the server flushes, finalizes and saves, then sends `completed`."""
        if not self._bye_sent:
            self._bye_sent = True
            await self.send_json({"type": "bye"})

    # -- receiving -----------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        while not self._done:
            msg = await self._messages.get()
            if msg is None:
                self._done = True
                return
            t = msg.get("type")
            if t == "completed":
                self.completed = msg
            elif t == "error":
                self.error = msg
            yield msg
            if t in ("completed", "error"):
                self._done = True

    async def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next message within `timeout` seconds (None when the call is over)."""
        if self._done:
            return None
        msg = await asyncio.wait_for(self._messages.get(), timeout)
        if msg is None:
            self._done = True
        return msg

    async def wait_played(self, timeout: float | None = None) -> None:
        """Until the whole audio has been sent."""
        await asyncio.wait_for(self.track.played.wait(), timeout)

    # -- teardown ------------------------------------------------------------------------------
    async def __aexit__(self, exc_type: Any, *_: Any) -> None:
        """A clean exit says `bye` and waits (bounded) for `completed`; any exit closes the connection."""
        try:
            if exc_type is None and not self._done and self.ready is not None:
                await self.bye()
                with contextlib.suppress(asyncio.TimeoutError):
                    async with asyncio.timeout(30):
                        async for _ in self:
                            pass
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Hang up without `bye` (the server still completes the job with what it received)."""
        if self.pc is not None:
            await self.pc.close()
        self.track.stop()
        self._messages.put_nowait(None)


if __name__ == "__main__":  # the command line moved: say where, instead of doing nothing
    import sys

    print("the WebRTC client's command line is `callbridge webrtc FILE.wav` (python -m bridge webrtc)",
          file=sys.stderr)
    sys.exit(2)
