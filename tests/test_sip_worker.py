"""The pjsua2 SIP worker, end to end: a real `python -m sip.worker` process, real SIP peers
(`python -m sip.peer` and baresip) placing and answering calls over loopback UDP/TCP, and a real
Unix socket server standing in for the service's end of the control channel (it only reads and
writes sip/protocol.py frames, so the test sees exactly what the service would).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sip.ports import free_sip_port

from bench.corpus import _resample, read_wav, synthesize, write_wav
from sip.dispatcher import Dispatcher
from sip.dispatcher import Worker as DispatcherWorker
from sip.protocol import encode, read_message
from sip.routing import Router

pytest.importorskip("pjsua2")

ROOT = Path(__file__).resolve().parents[1]
SPEECH_A = "Hello, this is the caller. My internet is down again."
SPEECH_B = "Thank you for calling, this is Dana."
FRAME_BYTES = 640


def _free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A port free for both UDP and TCP (the worker binds both), outside the ephemeral range."""
    return free_sip_port()


# RTP blocks below the kernel's ephemeral range (32768+ here), where an outgoing connection or an
# unbound UDP socket could take a port between the pick and pjsua's bind; above the service's own
# default blocks (sip.rtp_port_start 20000 + 100 per worker). A random start keeps two test runs
# on one machine apart.
_rtp_base = itertools.cycle(range(24000 + 200 * random.randrange(20), 32600, 200))


# --------------------------------------------------------------------------- audio checks


def _envelope(pcm: np.ndarray, rate: int = 16000, win_ms: int = 20) -> np.ndarray:
    n = rate * win_ms // 1000
    x = pcm[: len(pcm) // n * n].astype(np.float64).reshape(-1, n)
    return np.sqrt((x * x).mean(axis=1) + 1.0)


def envelope_similarity(sent: np.ndarray, received: np.ndarray, max_lag_frames: int = 100) -> float:
    """Best normalized cross-correlation of 20 ms RMS envelopes (log) over lags up to 2 s: ~1 for the
    same speech through G.711 and jitter buffers, low for different speech."""
    a, b = np.log(_envelope(sent)), np.log(_envelope(received))
    best = -1.0
    for lag in range(-max_lag_frames, max_lag_frames + 1):
        x, y = (a[lag:], b) if lag >= 0 else (a, b[-lag:])
        n = min(len(x), len(y))
        if n < len(a) // 2:
            continue
        x, y = x[:n], y[:n]
        if x.std() == 0 or y.std() == 0:
            continue
        best = max(best, float(np.corrcoef(x, y)[0, 1]))
    return best


# --------------------------------------------------------------------------- control side


@dataclass
class ControlServer:
    """The service's end of the control channel: records every message the worker sends."""

    path: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    audio: dict[tuple[str, int], bytearray] = field(default_factory=lambda: defaultdict(bytearray))
    audio_sizes: set[int] = field(default_factory=set)
    writer: asyncio.StreamWriter | None = None
    closed: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._on_conn, path=self.path)

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        try:
            while (msg := await read_message(reader)) is not None:
                h, payload = msg
                if h["type"] == "audio":
                    self.audio[(h["call"], h["leg"])] += payload
                    self.audio_sizes.add(len(payload))
                    if any(m["type"] == "call_ended" and m["call"] == h["call"] for m in self.messages):
                        h = {"type": "audio_after_end", "call": h["call"]}  # must never happen
                    else:
                        continue
                self.messages.append(h)
                self._changed.set()
        finally:
            self.closed = True
            self._changed.set()

    async def send(self, header: dict[str, Any]) -> None:
        assert self.writer is not None, "worker not connected"
        self.writer.write(encode(header))
        await self.writer.drain()

    def of(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind and all(m.get(k) == v for k, v in match.items())]

    async def wait(self, kind: str, timeout: float = 10.0, count: int = 1, **match: Any) -> list[dict[str, Any]]:
        """The first `count` messages of `kind` matching `match`, waiting at most `timeout` s."""
        deadline = time.monotonic() + timeout
        while len(found := self.of(kind, **match)) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {count} x {kind} {match} within {timeout} s; got "
                                     f"{[m for m in self.messages if m['type'] != 'load']}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        return found[:count]

    def pcm(self, call: str, leg: int) -> np.ndarray:
        return np.frombuffer(bytes(self.audio[(call, leg)]), dtype="<i2")


@dataclass
class WorkerProc:
    proc: asyncio.subprocess.Process
    ctl: ControlServer
    port: int
    wid: int

    def uri(self, user: str = "bob", transport: str = "") -> str:
        return f"sip:{user}@127.0.0.1:{self.port}" + (f";transport={transport}" if transport else "")


@pytest.fixture
async def worker(tmp_path) -> Any:
    """Factory: start a real worker process with a config; all are shut down (and must exit 0)."""
    started: list[WorkerProc] = []

    async def start(**config: Any) -> WorkerProc:
        ctl = ControlServer(str(tmp_path / f"ctl{len(started)}.sock"))
        await ctl.start()
        port = _free_port()
        cfg = {"rtp_port_start": next(_rtp_base), "rtp_timeout_s": 10.0, **config}
        wid = len(started) + 1
        log_fd = os.open(tmp_path / f"worker{wid}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sip.worker", "--id", str(wid), "--host", "127.0.0.1", "--port", str(port),
                "--control", ctl.path, "--config-json", json.dumps(cfg), cwd=str(ROOT),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=log_fd)
        finally:
            os.close(log_fd)
        w = WorkerProc(proc, ctl, port, wid)
        started.append(w)
        hello = (await ctl.wait("hello", timeout=10))[0]
        assert hello == {"type": "hello", "worker": wid, "sip_port": port, "max_calls": cfg.get("max_calls", 4),
                         "pid": proc.pid}
        return w

    yield start
    for w in started:
        if w.proc.returncode is None:
            try:
                await w.ctl.send({"type": "shutdown"})
            except (AssertionError, ConnectionError):
                pass
            try:
                await asyncio.wait_for(w.proc.wait(), 10)
            except TimeoutError:
                w.proc.kill()
                await w.proc.wait()
                raise AssertionError(f"worker {w.wid} did not exit on shutdown")
        w.ctl.server.close()
        log = (tmp_path / f"worker{w.wid}.log").read_text(errors="replace")
        assert w.proc.returncode == 0, f"worker {w.wid} exited {w.proc.returncode}:\n{log[-3000:]}"
        assert "Traceback" not in log, log[-3000:]


@dataclass
class PeerResult:
    rc: int
    result: dict[str, Any] | None
    stderr: str


async def start_peer(*args: str) -> asyncio.subprocess.Process:
    """A sip.peer process; an `answer` peer is returned once its SIP port is bound (its
    readiness line on stderr), so a call to it cannot arrive first."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sip.peer", *args, cwd=str(ROOT), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    if args and args[0] == "answer":
        await peer_ready(proc)
    return proc


async def peer_ready(proc: asyncio.subprocess.Process, timeout: float = 20.0) -> None:
    """Read the peer's stderr up to its "sip.peer: <mode> on <addr>" line."""
    async def go() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            if line.startswith(b"sip.peer: ") and b" on " in line:
                return
        raise AssertionError(f"sip.peer exited ({await proc.wait()}) before it was ready")
    await asyncio.wait_for(go(), timeout)


async def wait_line(path: Path, text: str, count: int = 1, timeout: float = 10.0) -> None:
    """Until `path` (a worker's log) holds `count` lines containing `text`."""
    deadline = time.monotonic() + timeout
    while path.read_text(errors="replace").count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} x {text!r} not in {path.name} within {timeout} s")
        await asyncio.sleep(0.05)


async def finish_peer(proc: asyncio.subprocess.Process, timeout: float = 20.0) -> PeerResult:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"sip.peer did not finish within {timeout} s: {err.decode(errors='replace')[-2000:]}")
    lines = [ln for ln in out.decode().splitlines() if ln.strip()]
    return PeerResult(proc.returncode, json.loads(lines[-1]) if lines else None, err.decode(errors="replace"))


async def run_peer(*args: str, timeout: float = 20.0) -> PeerResult:
    return await finish_peer(await start_peer(*args), timeout)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, Any]:
    """Two different utterances as 8 kHz WAVs (the call's rate) plus their 16 kHz PCM for comparing."""
    d = tmp_path_factory.mktemp("speech")
    out: dict[str, Any] = {}
    for name, text in (("a", SPEECH_A), ("b", SPEECH_B)):
        pcm = synthesize(text)
        pcm = np.concatenate([np.zeros(1600, np.int16), pcm, np.zeros(1600, np.int16)])
        write_wav(d / f"{name}.wav", _resample(pcm, 16000, 8000), 8000)
        out[name], out[f"{name}_pcm"] = str(d / f"{name}.wav"), pcm
    short = synthesize("one two three")
    write_wav(d / "short.wav", short, 16000)
    out["short"], out["short_pcm"] = str(d / "short.wav"), short
    return out


# --------------------------------------------------------------------------- tests


async def test_call_audio_identity_and_bye(worker, speech, tmp_path):
    """A plain call: call_started carries the INVITE identity, the caller's speech arrives as
    640-byte 20 ms frames for as long as it was played, and the caller's BYE ends it."""
    w = await worker()
    r = await run_peer("call", w.uri("support"), "--play", speech["a"], "--header", "X-Customer: 42",
                       "--header", "X-Ticket: T-9", "--hold-s", "0")
    assert r.rc == 0, r.stderr[-2000:]
    assert r.result["sip_code"] == 200 and r.result["codec"] == "PCMU/8000" and r.result["hangup_by"] == "us"
    started = (await w.ctl.wait("call_started"))[0]
    ref = started["call"]
    assert ref == f"w{w.wid}-1" and started["legs"] == ["caller"] and started["target"] is None
    assert started["codec"] == "PCMU/8000"
    sip = started["sip"]
    assert sip["call_id"] == r.result["call_id"]
    assert "sip:peer@127.0.0.1" in sip["from"] and sip["to"].startswith("sip:support@127.0.0.1")
    assert sip["request_uri"] == w.uri("support") and sip["remote"].startswith("127.0.0.1:")
    assert sip["contact"].startswith("<sip:peer@127.0.0.1:")
    assert sip["headers"] == {"X-Customer": "42", "X-Ticket": "T-9"}
    ended = (await w.ctl.wait("call_ended", call=ref))[0]
    assert ended["reason"] == "bye_caller"
    assert w.ctl.audio_sizes == {FRAME_BYTES}
    got = w.ctl.pcm(ref, 0)
    sent_s = len(speech["a_pcm"]) / 16000
    assert abs(len(got) / 16000 - sent_s) < 0.5, (len(got) / 16000, sent_s)
    assert envelope_similarity(speech["a_pcm"], got) > 0.8
    assert w.ctl.of("load")[-1] == {"type": "load", "calls": 0, "slots_used": 0}
    assert not w.ctl.of("audio_after_end")


async def test_capture_ports_are_reused(worker, speech, tmp_path):
    """Sequential calls share one capture port: a Python port freed while pjmedia's clock thread
    runs can be called mid-deallocation and crash the worker, so ports are recycled and freed only
    after the clock is stopped at shutdown (which must still exit 0)."""
    w = await worker()
    for n in range(1, 4):
        r = await run_peer("call", w.uri(), "--play", speech["short"], "--hold-s", "0")
        assert r.rc == 0, r.stderr[-2000:]
        assert (await w.ctl.wait("call_ended", call=f"w{w.wid}-{n}"))[0]["reason"] == "bye_caller"
        # the port is kept 2 s after the call, then recycled by the 1 s monitor
        await wait_line(tmp_path / f"worker{w.wid}.log", "capture port recycled", count=n)
    assert len(w.ctl.pcm(f"w{w.wid}-3", 0)) / 16000 > 0.5  # a recycled port still captures
    await w.ctl.send({"type": "shutdown"})
    assert await asyncio.wait_for(w.proc.wait(), 10) == 0
    log = (tmp_path / f"worker{w.wid}.log").read_text(errors="replace")
    assert "1 capture port(s) served 3 call(s)" in log, log[-2000:]


async def test_dtmf_over_tcp_and_g722(worker, speech):
    """RFC 2833 digits become dtmf messages on leg 0; SIP over TCP works; G.722 is negotiated
    when the caller offers only it."""
    w = await worker()
    r = await run_peer("call", w.uri("ivr", "tcp"), "--play", speech["short"], "--dtmf", "12#",
                       "--dtmf-at", "0.3", "--hold-s", "0.8", "--codec", "G722/16000")
    assert r.rc == 0, r.stderr[-2000:]
    assert r.result["codec"] == "G722/16000"
    started = (await w.ctl.wait("call_started"))[0]
    assert started["codec"] == "G722/16000"
    digits = await w.ctl.wait("dtmf", count=3, timeout=5)
    assert [d["digit"] for d in digits] == ["1", "2", "#"]
    assert all(d["leg"] == 0 and d["call"] == started["call"] and d["duration_ms"] > 0 for d in digits)
    assert (await w.ctl.wait("call_ended"))[0]["reason"] == "bye_caller"
    assert len(w.ctl.of("dtmf")) == 3  # one message per digit, not per RFC 2833 packet


async def test_unsupported_codec_gets_488(worker, speech):
    """An offer with none of our codecs is refused by pjsua2 itself with 488; no call is reported."""
    w = await worker(codecs=["PCMU/8000", "PCMA/8000"])
    r = await run_peer("call", w.uri(), "--play", speech["short"], "--codec", "GSM/8000", "--timeout", "5")
    assert r.rc == 1 and r.result["sip_code"] == 488, (r.result, r.stderr[-1000:])
    assert "488" in r.stderr
    await asyncio.sleep(0.2)
    assert not w.ctl.of("call_started") and w.proc.returncode is None


async def test_hangup_from_service(worker, speech):
    """`hangup` from the control side: the caller gets a BYE, the worker reports reason hangup."""
    w = await worker()
    peer = await start_peer("call", w.uri(), "--play", speech["short"], "--hold-s", "15")
    started = (await w.ctl.wait("call_started"))[0]
    await asyncio.sleep(0.5)
    await w.ctl.send({"type": "hangup", "call": started["call"], "reason": "max_duration"})
    ended = (await w.ctl.wait("call_ended", call=started["call"]))[0]
    assert ended["reason"] == "hangup" and ended["detail"] == "max_duration"
    r = await finish_peer(peer, 10)
    assert r.rc == 0 and r.result["hangup_by"] == "remote", r.stderr[-1000:]


async def test_bridge_both_directions(worker, speech, tmp_path):
    """Bridge mode: the caller is connected to the routed target only when it answers; each party
    hears the other, and the service gets the caller on leg 0 and the agent on leg 1."""
    callee_port = _free_port()
    w = await worker(routes={"sales": f"sip:agent@127.0.0.1:{callee_port}"})
    callee = await start_peer("answer", "--port", str(callee_port), "--play", speech["b"],
                              "--record", str(tmp_path / "callee.wav"), "--timeout", "30")
    r = await run_peer("call", w.uri("sales"), "--play", speech["a"], "--record", str(tmp_path / "caller.wav"),
                       "--hold-s", "1", timeout=30)
    assert r.rc == 0, r.stderr[-2000:]
    rc = await finish_peer(callee, 10)
    assert rc.rc == 0 and rc.result["hangup_by"] == "remote", rc.stderr[-1000:]
    started = (await w.ctl.wait("call_started"))[0]
    ref = started["call"]
    assert started["legs"] == ["caller", "agent"] and started["target"] == f"sip:agent@127.0.0.1:{callee_port}"
    assert (await w.ctl.wait("call_ended", call=ref))[0]["reason"] == "bye_caller"
    a, b = speech["a_pcm"], speech["b_pcm"]
    leg0, leg1 = w.ctl.pcm(ref, 0), w.ctl.pcm(ref, 1)
    assert envelope_similarity(a, leg0) > 0.8 and envelope_similarity(b, leg1) > 0.8
    assert envelope_similarity(a, leg1) < 0.6 and envelope_similarity(b, leg0) < 0.6  # legs not swapped/mixed
    heard_by_callee, rate = read_wav(tmp_path / "callee.wav")
    heard_by_caller, rate2 = read_wav(tmp_path / "caller.wav")
    assert envelope_similarity(a, _resample(heard_by_callee, rate, 16000)) > 0.8
    assert envelope_similarity(b, _resample(heard_by_caller, rate2, 16000)) > 0.8
    assert w.ctl.of("load")[-1]["slots_used"] == 0


async def test_bridge_agent_hangs_up_and_no_agent_capture(worker, speech):
    """The agent's BYE ends the call (bye_agent) and the caller gets a BYE; with transcribe_agent
    off only the caller leg is captured. The target here comes from the INVITE's target header
    (allowed by config), which wins over the "*" route."""
    callee_port, nowhere = _free_port(), _free_port()
    w = await worker(routes={"*": f"sip:nobody@127.0.0.1:{nowhere}"}, allow_target_header=True,
                     transcribe_agent=False)
    callee = await start_peer("answer", "--port", str(callee_port), "--play", speech["short"],
                              "--hangup-after", "1.5", "--timeout", "20")
    target = f"sip:agent@127.0.0.1:{callee_port}"
    r = await run_peer("call", w.uri("anyone"), "--play", speech["a"], "--hold-s", "5",
                       "--header", f"X-Callbridge-Target: <{target}>")
    assert r.rc == 0 and r.result["hangup_by"] == "remote", r.stderr[-1000:]
    await finish_peer(callee, 10)
    started = (await w.ctl.wait("call_started"))[0]
    assert started["legs"] == ["caller"] and started["target"] == target
    assert (await w.ctl.wait("call_ended"))[0]["reason"] == "bye_agent"
    assert {leg for (_, leg) in w.ctl.audio} == {0}


async def test_bridge_cancel_and_target_busy(worker, speech):
    """A caller that gives up while the target rings: call_ended cancel and the target's INVITE is
    cancelled too. A target that answers 486 is passed back to the caller."""
    ring_port, busy_port = _free_port(), _free_port()
    w = await worker(routes={"ring": f"sip:a@127.0.0.1:{ring_port}", "busy": f"sip:b@127.0.0.1:{busy_port}"})
    ringing = await start_peer("answer", "--port", str(ring_port), "--play", speech["short"], "--ring-s", "30",
                               "--timeout", "40")
    busy = await start_peer("answer", "--port", str(busy_port), "--play", speech["short"], "--reject", "486",
                            "--timeout", "20")
    r = await run_peer("call", w.uri("ring"), "--play", speech["short"], "--timeout", "1.5")
    assert r.rc == 1 and r.result["sip_code"] == 487, r.result
    ended = (await w.ctl.wait("call_ended", timeout=5))[0]
    assert ended["reason"] == "cancel"
    rr = await finish_peer(ringing, 5)  # the target saw the CANCEL and gave up
    assert rr.result["sip_code"] == 487, rr.result
    r = await run_peer("call", w.uri("busy"), "--play", speech["short"], "--timeout", "5")
    assert r.rc == 1 and r.result["sip_code"] == 486, r.result
    await finish_peer(busy, 5)
    assert not w.ctl.of("call_started")
    assert [m["reason"] for m in w.ctl.of("call_ended")] == ["cancel", "error"]
    assert w.ctl.of("call_ended")[1]["sip_code"] == 486


async def test_bridge_needs_two_slots(worker, speech):
    """A bridged call takes two pjsua slots: with max_calls=1 the caller gets 486 (no slot for the
    outbound leg) instead of a call nobody can be connected to."""
    w = await worker(max_calls=1, routes={"*": f"sip:agent@127.0.0.1:{_free_port()}"})
    r = await run_peer("call", w.uri(), "--play", speech["short"], "--timeout", "5")
    assert r.rc == 1 and r.result["sip_code"] == 486, r.result
    ended = (await w.ctl.wait("call_ended"))[0]
    assert ended["reason"] == "error" and ended["sip_code"] == 486
    assert (await w.ctl.wait("load", slots_used=0, calls=0, count=2))


class EventLog:
    """The dispatcher's log events (its logger is injected): what it decided for each INVITE."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def bind(self, **_: Any) -> EventLog:
        return self

    def _record(self, event: str, **kw: Any) -> None:
        self.events.append({"event": event, **kw})

    debug = info = warning = error = exception = _record

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]


@pytest.mark.parametrize("callee_uri, via_proxy, sent", [
    ("tel:+15551234;phone-context=example.com", True, "tel:+15551234"),  # tel: needs the dispatcher as proxy
    # the feature code *72#: pjsip sends "#" escaped (it unescapes and re-escapes the user part)
    ("sip:%2A72%23@127.0.0.1:{dispatcher}", False, "72%23@"),
], ids=["tel", "percent-encoded"])
async def test_dispatcher_and_worker_agree_on_bridging(worker, speech, callee_uri, via_proxy, sent):
    """A real dispatcher in front of a real worker, a real pjsua2 caller: for a tel: and a
    percent-encoded request-URI, the slots the dispatcher counts for the call (2 when bridged)
    match the worker's decision to bridge it, and the call is bridged to the routed target."""
    callee_port = _free_port()
    target = f"sip:agent@127.0.0.1:{callee_port}"
    routes = {"+15551234": target, "*72#": target}
    w = await worker(routes=routes)
    log = EventLog()
    d = Dispatcher("127.0.0.1", 0, [DispatcherWorker(w.wid, "127.0.0.1", w.port, 4, alive=True)],
                   Router(routes), logger=log)
    await d.start()
    callee = await start_peer("answer", "--port", str(callee_port), "--play", speech["b"], "--timeout", "30")
    try:
        args = ["call", callee_uri.format(dispatcher=d.port), "--play", speech["short"], "--hold-s", "0"]
        if via_proxy:
            args += ["--proxy", f"sip:127.0.0.1:{d.port}"]
        r = await run_peer(*args)
        started = (await w.ctl.wait("call_started"))[0]
        forwarded = log.of("sip_invite_forwarded")
        assert len(forwarded) == 1, log.events
        worker_slots = 2 if started["target"] else 1
        assert forwarded[0]["slots"] == worker_slots, (forwarded[0], started)
        assert started["target"] == target and started["legs"] == ["caller", "agent"], started
        assert r.rc == 0 and r.result["sip_code"] == 200, r.stderr[-2000:]
        rc = await finish_peer(callee)
        assert rc.rc == 0 and rc.result["sip_code"] == 200, rc.stderr[-2000:]
        assert sent in started["sip"]["request_uri"], started["sip"]  # the worker saw the URI as sent
        assert (await w.ctl.wait("call_ended", call=started["call"]))[0]["reason"] == "bye_caller"
    finally:
        if callee.returncode is None:
            callee.kill()
            await callee.wait()
        await d.stop()


async def test_rtp_timeout(worker, speech):
    """A caller whose RTP stops (process frozen with SIGSTOP) is hung up after rtp_timeout_s."""
    w = await worker(rtp_timeout_s=2)
    peer = await start_peer("call", w.uri(), "--play", speech["short"], "--hold-s", "20")
    started = (await w.ctl.wait("call_started"))[0]
    await asyncio.sleep(0.5)
    os.kill(peer.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        ended = (await w.ctl.wait("call_ended", call=started["call"], timeout=8))[0]
    finally:
        os.kill(peer.pid, signal.SIGCONT)
    assert ended["reason"] == "rtp_timeout"
    assert time.monotonic() - t0 > 1.5  # not before rtp_timeout_s (the wait above bounds it from above)
    r = await finish_peer(peer, 10)  # the BYE is retransmitted until the caller answers it
    assert r.rc == 0 and r.result["hangup_by"] == "remote", r.stderr[-1000:]


async def test_fifth_call_is_busy(worker, speech):
    """max_calls=4: a 5th concurrent call gets 486 and the worker keeps taking calls afterwards."""
    w = await worker(max_calls=4)
    peers = [await start_peer("call", w.uri(f"u{i}"), "--play", speech["short"], "--hold-s", "3")
             for i in range(4)]
    await w.ctl.wait("call_started", count=4, timeout=15)
    r = await run_peer("call", w.uri("u5"), "--play", speech["short"], "--timeout", "5")
    assert r.rc == 1 and r.result["sip_code"] == 486, r.result
    results = [await finish_peer(p, 20) for p in peers]
    assert all(x.rc == 0 for x in results), [x.stderr[-500:] for x in results]
    await w.ctl.wait("call_ended", count=4)
    assert w.proc.returncode is None
    r = await run_peer("call", w.uri("again"), "--play", speech["short"], "--hold-s", "0")
    assert r.rc == 0 and r.result["sip_code"] == 200


@pytest.mark.parametrize("how", ["message", "sigterm"])
async def test_shutdown_hangs_up_and_exits(worker, speech, how):
    """`shutdown` or SIGTERM: live calls end with reason shutdown (the caller gets a BYE, even one
    answered a moment ago whose ACK is still on its way), the worker exits 0."""
    w = await worker()
    peer = await start_peer("call", w.uri(), "--play", speech["short"], "--hold-s", "15")
    started = (await w.ctl.wait("call_started"))[0]
    if how == "message":
        await w.ctl.send({"type": "shutdown"})
    else:
        w.proc.send_signal(signal.SIGTERM)
    assert (await w.ctl.wait("call_ended", call=started["call"]))[0]["reason"] == "shutdown"
    assert await asyncio.wait_for(w.proc.wait(), 10) == 0
    r = await finish_peer(peer, 10)
    assert r.rc == 0 and r.result["hangup_by"] == "remote"


async def test_control_socket_closed_stops_worker(worker):
    """If the service goes away (control socket closed) the worker exits cleanly by itself."""
    w = await worker()
    assert w.ctl.writer is not None
    w.ctl.writer.close()
    assert await asyncio.wait_for(w.proc.wait(), 10) == 0


@pytest.mark.skipif(shutil.which("baresip") is None, reason="baresip not installed")
async def test_baresip_caller(worker, speech, tmp_path):
    """A third-party SIP stack (baresip) calls the worker and its audio arrives intact."""
    w = await worker()
    conf = tmp_path / "baresip"
    conf.mkdir()
    sip_port = _free_port()
    (conf / "config").write_text(
        f"sip_listen 127.0.0.1:{sip_port}\nnet_interface 127.0.0.1\naudio_source aufile,{speech['a']}\n"
        "audio_player aubridge,nil\naudio_alert aubridge,nil\naudio_srate 8000\naudio_channels 1\n"
        f"rtp_ports {next(_rtp_base)}-{next(_rtp_base)}\nmodule_path /usr/lib/baresip/modules\n"
        + "".join(f"module {m}.so\n" for m in ("stdio", "g711", "aufile", "aubridge", "account", "menu")))
    (conf / "accounts").write_text(f"<sip:test@127.0.0.1:{sip_port}>;regint=0\n")
    proc = await asyncio.create_subprocess_exec(
        "baresip", "-f", str(conf), "-e", f"/dial {w.uri('baresip')}", "-t", "15", cwd=str(tmp_path),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        started = (await w.ctl.wait("call_started", timeout=10))[0]
        ended = (await w.ctl.wait("call_ended", timeout=15))[0]
    except AssertionError as e:
        proc.kill()
        out, _ = await proc.communicate()
        raise AssertionError(f"{e}\nbaresip: {out.decode(errors='replace')[-2000:]}") from None
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.communicate(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert started["sip"]["from"].startswith("<sip:test@127.0.0.1") and started["codec"] in ("PCMU/8000", "PCMA/8000")
    assert ended["reason"] == "bye_caller"
    assert envelope_similarity(speech["a_pcm"], w.ctl.pcm(started["call"], 0)) > 0.8


class _Redirector(asyncio.DatagramProtocol):
    """A minimal SIP front that answers every INVITE with 302 to a worker (as a dispatcher may):
    the thing under test is the peer following it, so this side is hand-made."""

    def __init__(self, contact: str) -> None:
        self.contact, self.redirected = contact, 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        text = data.decode(errors="replace")
        if not text.startswith("INVITE "):
            return  # the ACK for the 302
        head = text.split("\r\n\r\n", 1)[0].split("\r\n")
        keep = [h for h in head[1:] if h.split(":", 1)[0].strip().lower() in ("via", "from", "to", "call-id", "cseq")]
        keep = [h + ";tag=redir" if h.lower().startswith("to:") else h for h in keep]
        resp = "\r\n".join(["SIP/2.0 302 Moved Temporarily", *keep, f"Contact: <{self.contact}>",
                            "Content-Length: 0", "", ""])
        self.transport.sendto(resp.encode(), addr)
        self.redirected += 1


async def test_peer_follows_302(worker, speech):
    """sip.peer (and so `callbridge call`) follows a 302 from a front to the worker it names."""
    w = await worker()
    loop = asyncio.get_running_loop()
    transport, redir = await loop.create_datagram_endpoint(lambda: _Redirector(w.uri("front")),
                                                           local_addr=("127.0.0.1", 0))
    try:
        front = transport.get_extra_info("sockname")[1]
        r = await run_peer("call", f"sip:front@127.0.0.1:{front}", "--play", speech["short"], "--hold-s", "0")
    finally:
        transport.close()
    assert r.rc == 0 and r.result["sip_code"] == 200, (r.result, r.stderr[-1500:])
    assert redir.redirected >= 1
    started = (await w.ctl.wait("call_started"))[0]
    assert started["sip"]["request_uri"] == w.uri("front")


async def test_callbridge_call_command(worker, speech, tmp_path, capsys):
    """`callbridge call` places a real call through sip.peer and prints what it sent."""
    import argparse

    from bridge.commands.call import DISPATCH, add_call_parser

    w = await worker()
    parser = argparse.ArgumentParser(prog="callbridge")
    add_call_parser(parser.add_subparsers(dest="group"))
    args = parser.parse_args(["call", w.uri("cli"), "--play", speech["short"], "--hold-s", "0",
                              "--header", "X-From-Cli: yes", "--json", "--record", str(tmp_path / "heard.wav")])
    rc = await asyncio.wait_for(asyncio.to_thread(DISPATCH[args.command], args), 30)
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(out.splitlines()[0])
    assert result["sip_code"] == 200 and result["recorded"] == str(tmp_path / "heard.wav")
    assert f"called {w.uri('cli')}: 200 OK" in out and "codec     PCMU/8000" in out
    started = (await w.ctl.wait("call_started"))[0]
    assert started["sip"]["headers"] == {"X-From-Cli": "yes"} and started["sip"]["call_id"] == result["call_id"]
    bad = parser.parse_args(["call", w.uri(), "--play", str(tmp_path / "missing.wav")])
    from bridge.cli import UsageError

    with pytest.raises(UsageError, match="no such file"):
        DISPATCH["call"](bad)
