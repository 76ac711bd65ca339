"""A SIP worker process: one pjsua2 user agent (at most 4 pjsua call slots) that answers the calls
the dispatcher forwards to it and streams each call leg's audio to the service.

    python -m sip.worker --id N --host 127.0.0.1 --port P --control /path/sock --config-json '{...}'
                         [--parent-pid PID]

The worker dies with the service: SIGTERM from the kernel when its parent dies (PR_SET_PDEATHSIG),
a stop when the control channel ends however it ends (EOF, reset), and a check of its parent pid
every second; once stopping, SIGALRM ends it after STOP_DEADLINE_S even if pjsua hangs.

config-json keys (all optional): rtp_port_start (first RTP port; the worker uses a block of 100),
codecs (priority list, e.g. ["PCMU/8000", "PCMA/8000", "G722/16000"]; every other codec is disabled
so it is never offered or accepted: an INVITE offering none of them gets 488 from pjsua2), routes
({user: sip_uri}, "*" = any user), target_header, allow_target_header, transcribe_agent,
rtp_timeout_s, max_calls (1..4), public_address (put in Contact/Via and SDP), log_level (pjsua2, 0-5).

Why a process per 4 calls: the pjsua2 wheel is compiled with PJSUA_MAX_CALLS = 4. Why this
threading: pjsua2 runs with no worker threads (threadCnt 0, mainThreadOnly) and is polled from the
asyncio loop with libHandleEvents(0), so every SIP callback runs on the loop thread; only audio
frames arrive on pjmedia's clock thread and are handed over with loop.call_soon_threadsafe (FIFO,
so frames keep their order). The control channel is sip/protocol.py.

A call ends with call_ended reason: bye_caller, bye_agent (bridged target hung up), cancel (caller
gave up before the answer), rtp_timeout, hangup (the service asked; its reason is in `detail`),
error (e.g. the bridge target failed; sip_code is its status), shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from sip import pjsua
from sip.message import SipParseError, parse_message
from sip.pjsua import DTMF_IS_END, DTMF_IS_UPDATE, PJ_ETOOMANY
from sip.protocol import MessageError, encode, read_message
from sip.routing import RouteError, Router

__all__ = ["WorkerConfig", "main"]

POLL_S = 0.005  # libHandleEvents cadence: SIP timers and sockets are serviced from the loop
MONITOR_S = 1.0  # RTP inactivity check
SHUTDOWN_WAIT_S = 3.0  # for BYE/CANCEL transactions to finish before libDestroy
SHUTDOWN_GRACE_S = 0.5  # SIP kept running after the last hangup (ACK-delayed BYEs, retransmissions)
RTP_BLOCK = 100
MAX_BUFFERED = 64 << 20  # control-channel bytes queued before the service is declared stuck
PR_SET_PDEATHSIG = 1
STOP_DEADLINE_S = 15  # once stopping, SIGALRM ends the process after this even if pjsua hangs



def log(msg: str) -> None:
    """To stderr (the service's pipe). Once the service is gone the pipe is broken; a failed log
    line must not abort what the worker is doing (shutting down, most likely)."""
    try:
        print(f"sip.worker[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def die_with_parent(parent: int) -> bool:
    """Ask the kernel for SIGTERM when the service dies, whatever kills it (kill -9 too): the
    handler hangs up and exits, so no worker outlives the service holding its ports. Linux only
    (prctl PR_SET_PDEATHSIG); the parent watch in `Worker.run` is the second guard. The signal
    comes when the *thread* that spawned us exits: the service spawns from its event loop thread.
    False if `parent` is already gone (we were reparented before the prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log(f"prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}")
    except (OSError, AttributeError) as e:
        log(f"prctl(PR_SET_PDEATHSIG) unavailable: {e}")
    return os.getppid() == parent


def _guarded(fn: Any, *args: Any) -> None:
    """Run a pjsua2 callback body: an exception must not cross back into pjsua2's C++ frames
    (SWIG would print it and carry on half-done), so it is logged with its traceback here."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - the callback boundary: log everything, keep serving calls
        log(f"error in {fn.__name__}:\n{traceback.format_exc()}")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class WorkerConfig:
    rtp_port_start: int = 20000
    codecs: tuple[str, ...] = ("PCMU/8000", "PCMA/8000", "G722/16000")
    routes: dict[str, str] = field(default_factory=dict)
    target_header: str = "X-Callbridge-Target"
    allow_target_header: bool = False
    transcribe_agent: bool = True
    rtp_timeout_s: float = 30.0
    max_calls: int = 4
    public_address: str = ""
    log_level: int = 1

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        try:
            d = json.loads(text or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"--config-json is not JSON: {e}") from None
        if not isinstance(d, dict):
            raise TypeError("--config-json must be a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            log(f"ignoring unknown config keys: {', '.join(unknown)}")
        d = {k: v for k, v in d.items() if k in known}
        if "codecs" in d:
            d["codecs"] = tuple(d["codecs"])
        if "routes" in d:
            if not isinstance(d["routes"], dict):
                raise TypeError("routes must be an object {user: sip_uri}")
            d["routes"] = {str(k): str(v) for k, v in d["routes"].items()}
        c = cls(**d)
        if not 1 <= int(c.max_calls) <= 4:
            raise ValueError(f"max_calls must be 1..4 (pjsua2 holds 4 calls per process), got {c.max_calls}")
        if not 1024 <= int(c.rtp_port_start) <= 65535 - RTP_BLOCK:
            raise ValueError(f"rtp_port_start {c.rtp_port_start} out of range")
        if float(c.rtp_timeout_s) <= 0:
            raise ValueError("rtp_timeout_s must be > 0")
        return c


# --------------------------------------------------------------------------- calls


@dataclass
class _Leg:
    """pjsua2-independent state of one call leg (the Call subclass is made in Worker)."""

    index: int  # 0 caller, 1 agent
    confirmed: bool = False
    answered: bool = False  # 200 sent (caller) / received (agent)
    disconnected: bool = False
    hanging_up: bool = False
    media_idx: int | None = None
    rx_pkt: int = -1
    last_rx: float = 0.0
    on_hold: bool = False


@dataclass
class Session:
    """One call as the service sees it: the caller leg and, when bridged, the agent leg."""

    ref: str
    caller: Any  # WCall
    target: str | None = None
    agent: Any = None  # WCall | None
    sip: dict[str, Any] = field(default_factory=dict)
    codec: str | None = None
    started: bool = False  # call_started sent
    closing: bool = False  # finish() ran: legs hanging up
    ended: bool = False  # call_ended sent: no audio after it
    captures: list[Any] = field(default_factory=list)
    dtmf_open: dict[int, tuple[str, float]] = field(default_factory=dict)  # leg -> (digit, unix time)


class Worker:
    def __init__(self, wid: int, host: str, port: int, control: str, cfg: WorkerConfig, parent: int = 0) -> None:
        self.wid, self.host, self.port, self.control, self.cfg = wid, host, port, control, cfg
        self.parent = parent or os.getppid()
        self.router = Router(cfg.routes, cfg.target_header, cfg.allow_target_header)
        self.sessions: dict[str, Session] = {}
        self.alive: set[Any] = set()  # WCalls holding a pjsua slot
        self.graveyard: list[tuple[float, Any]] = []  # (until, Call/port) kept until pjsua is surely done
        # Capture ports are reused, never freed while the media clock runs (see pjsua.stop_media_clock)
        self.spare_captures: list[Any] = []
        self.captures_made = 0
        self.seq = 0
        self.writer: asyncio.StreamWriter | None = None
        self.stopping: asyncio.Event | None = None
        self.stop_reason = ""
        self._load_pending = False
        self._slots_reported = -1
        self._call_count: Any = None  # pjsua_call_counter(), once pjsua is loaded
        self._closed = False

    # ---------------------------------------------------------------- control channel

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        w = self.writer
        if w is None or self._closed or w.is_closing():
            return
        w.write(encode(header, payload))
        if w.transport.get_write_buffer_size() > MAX_BUFFERED:
            log(f"control channel stuck: over {MAX_BUFFERED >> 20} MB queued; shutting down")
            self._closed = True
            self.request_stop("control channel stuck")

    def send_audio(self, sess: Session, leg: int, data: bytes) -> None:
        if not sess.ended:  # nothing after call_ended; frames queued before it were already sent
            self.send({"type": "audio", "call": sess.ref, "leg": leg}, data)

    def schedule_load(self) -> None:
        if not self._load_pending:
            self._load_pending = True
            self.loop.call_soon(self._send_load)

    def slots_used(self) -> int:
        """Call slots pjsua holds: what decides whether it takes the next INVITE or answers 486."""
        held = self._call_count() if self._call_count is not None else 0
        return max(held, len(self.alive))

    def _send_load(self) -> None:
        self._load_pending = False
        self._slots_reported = self.slots_used()
        self.send({"type": "load", "calls": sum(1 for s in self.sessions.values() if not s.closing),
                   "slots_used": self._slots_reported})

    def request_stop(self, why: str) -> None:
        if self.stopping is not None and not self.stopping.is_set():
            self.stop_reason = why
            self.stopping.set()
            signal.alarm(STOP_DEADLINE_S)  # a shutdown stuck in pjsua must not keep the ports bound

    async def _read_control(self, reader: asyncio.StreamReader) -> None:
        """Until the channel ends, however it ends: then the worker stops (the service is gone
        or wants it gone). A reset (the service killed with our audio unread) counts too."""
        why = "control channel closed"
        try:
            while True:
                msg = await read_message(reader)
                if msg is None:
                    return
                h, _ = msg
                kind = h.get("type")
                if kind == "hangup":
                    sess = self.sessions.get(str(h.get("call")))
                    if sess is None or sess.closing:
                        continue
                    why = str(h.get("reason") or "request")
                    if why == "shutdown":
                        self.finish(sess, "shutdown", detail="service shutdown", unanswered_code=503)
                    else:
                        self.finish(sess, "hangup", detail=why, unanswered_code=480, bye_reason=why)
                elif kind == "shutdown":
                    why = "shutdown requested"
                    return
                else:
                    log(f"ignoring control message {kind!r}")
        except (MessageError, ConnectionError, OSError) as e:
            why = f"control channel error: {e}"
        finally:
            self.request_stop(why)

    # ---------------------------------------------------------------- pjsua2 objects

    def _build(self) -> None:
        pj = pjsua.load()
        worker = self

        class Capture(pj.AudioMediaPort):
            """Receives one leg's audio (16 kHz mono, 20 ms) on the media clock thread. Reused from
            call to call (Worker.spare_captures); attach() hands it to a session."""

            closed = True  # until attach(); also the answer if a frame ever sees a cleared __dict__

            def __init__(self) -> None:
                super().__init__()
                self.sess: Session | None = None
                self.leg = 0
                self.post = worker.loop.call_soon_threadsafe
                self.sink = worker.send_audio

            def attach(self, sess: Session, leg: int) -> None:
                self.sess, self.leg, self.closed = sess, leg, False

            def onFrameReceived(self, frame: Any) -> None:
                if self.closed or frame.type != pj.PJMEDIA_FRAME_TYPE_AUDIO:
                    return
                try:
                    self.post(self.sink, self.sess, self.leg, bytes(frame.buf))
                except (RuntimeError, AttributeError):  # loop closing / instance being freed: teardown
                    self.closed = True

        class WCall(pj.Call):
            def __init__(self, acc: Any, call_id: int, sess: Session | None, leg: int) -> None:
                if call_id is None:
                    super().__init__(acc)
                else:
                    super().__init__(acc, call_id)
                self.sess, self.leg = sess, _Leg(leg)

            def onCallState(self, prm: Any) -> None:
                _guarded(worker._on_state, self, self.getInfo())

            def onCallMediaState(self, prm: Any) -> None:
                _guarded(worker._on_media, self, self.getInfo())

            def onDtmfEvent(self, prm: Any) -> None:
                _guarded(worker._on_dtmf, self, prm)

        class WAccount(pj.Account):
            def onIncomingCall(self, prm: Any) -> None:
                _guarded(worker._on_incoming, self, prm)

        self.Capture, self.WCall, self.WAccount = Capture, WCall, WAccount

    def start_sip(self) -> None:
        pj = pjsua.load()
        cfg = self.cfg
        self._build()
        self.ep, self._keep = pjsua.create_endpoint(log_level=cfg.log_level, max_calls=cfg.max_calls)
        self._call_count = pjsua.pjsua_call_counter(log)
        enabled = pjsua.set_codecs(self.ep, cfg.codecs)
        public = cfg.public_address if cfg.public_address not in ("", "0.0.0.0", "::", "[::]") else ""
        for kind in ("udp", "tcp"):
            pjsua.add_transport(self.ep, kind, self.host, self.port, public)
        self.ep.libStart()
        a = pj.AccountConfig()
        a.idUri = f"sip:worker{self.wid}@{public or self.host}:{self.port}"
        pjsua.media_transport(a, self.host, cfg.rtp_port_start, RTP_BLOCK, public)
        self.acc = self.WAccount()
        self.acc.create(a)
        log(f"worker {self.wid} listening on {self.host}:{self.port} (UDP, TCP), RTP {cfg.rtp_port_start}+"
            f"{RTP_BLOCK}, codecs {', '.join(enabled)}, max_calls {cfg.max_calls}")

    # ---------------------------------------------------------------- pjsua2 callbacks (loop thread)

    def _on_incoming(self, acc: Any, prm: Any) -> None:
        call = self.WCall(acc, prm.callId, None, 0)
        self.alive.add(call)
        if self.stopping is not None and self.stopping.is_set():
            self._reject(call, 503, "Shutting down")
            return
        try:
            self._accept(call, prm.rdata)
        except Exception:
            self._reject(call, 500)
            raise

    def _accept(self, call: Any, rdata: Any) -> None:
        pj = pjsua.load()
        try:
            invite = parse_message(rdata.wholeMsg.encode("utf-8", "surrogateescape"))
        except SipParseError as e:  # pjsip parsed it: at worst a part we do not need is off
            if e.partial is None:
                log(f"unreadable INVITE: {e}")
                self._reject(call, 400, str(e)[:100])
                return
            invite = e.partial
        self.seq += 1
        ref = f"w{self.wid}-{self.seq}"
        ci = call.getInfo()

        def header(name: str, default: str) -> str:
            value = invite.joined(name)
            return default if value is None else value

        sip = {"call_id": invite.joined("Call-ID") or ci.callIdString, "from": header("From", ci.remoteUri),
               "to": header("To", ci.localUri), "request_uri": invite.uri or "",
               "contact": header("Contact", ci.remoteContact), "remote": rdata.srcAddress,
               "headers": invite.extension_headers()}
        try:
            target = self.router.bridge_target(invite)  # the dispatcher counted its slots on the same call
        except RouteError as e:
            log(f"{ref}: bad bridge target: {e}")
            self._reject(call, 400, str(e)[:100])
            return
        sess = Session(ref, call, target=target, sip=sip)
        call.sess = sess
        self.sessions[ref] = sess
        op = pj.CallOpParam()
        op.statusCode = 180
        call.answer(op)
        if target:
            self.loop.call_soon(self._place_outbound, sess)
        else:
            op = pj.CallOpParam()
            op.statusCode = 200
            call.answer(op)
            call.leg.answered = True
        self.schedule_load()

    def _reject(self, call: Any, code: int, reason: str = "") -> None:
        pj = pjsua.load()
        op = pj.CallOpParam()
        op.statusCode = code
        if reason:
            op.reason = reason
        call.leg.hanging_up = True
        try:
            call.answer(op)
        except pj.Error as e:
            log(f"reject {code} failed: {e.info()}")

    def _place_outbound(self, sess: Session) -> None:
        pj = pjsua.load()
        if sess.closing or sess.caller.leg.disconnected:
            return
        agent = self.WCall(self.acc, None, sess, 1)
        op = pj.CallOpParam(True)
        try:
            agent.makeCall(sess.target, op)
        except pj.Error as e:
            busy = e.status == PJ_ETOOMANY
            code = 486 if busy else 503
            log(f"{sess.ref}: cannot call bridge target {sess.target}: {e.info()}")
            self._bury(agent)
            self.finish(sess, "error", sip_code=code, unanswered_code=code,
                        detail="no free call slot for the bridge leg" if busy else f"cannot call target: {e.reason}")
            return
        sess.agent = agent
        self.alive.add(agent)
        self.schedule_load()

    def _on_state(self, call: Any, ci: Any) -> None:
        pj = pjsua.load()
        leg: _Leg = call.leg
        sess: Session | None = call.sess
        if ci.state == pj.PJSIP_INV_STATE_CONFIRMED:
            leg.confirmed = leg.answered = True
            if sess is not None and leg.index == 1:
                if sess.closing:
                    self._hangup_leg(call, 200)
                else:
                    self.loop.call_soon(self._answer_caller, sess)
        elif ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            if leg.disconnected:
                return
            leg.disconnected = True
            self.alive.discard(call)
            self._bury(call)
            code, why = int(ci.lastStatusCode or 0), ci.lastReason
            if sess is not None and not sess.closing and not leg.hanging_up:
                if leg.index == 0:
                    if leg.answered:
                        self.finish(sess, "bye_caller", detail="caller hung up")
                    elif code == 487:
                        self.finish(sess, "cancel", sip_code=487, detail="caller cancelled before the answer")
                    else:
                        self.finish(sess, "error", sip_code=code or None, detail=f"caller leg ended: {code} {why}")
                elif leg.answered:
                    self.finish(sess, "bye_agent", detail="agent hung up")
                else:
                    fail = code if 400 <= code <= 699 else 503
                    self.finish(sess, "error", sip_code=fail, unanswered_code=fail,
                                detail=f"bridge target {sess.target} answered {code} {why}".strip())
            if sess is not None and sess.closing and all(
                    c is None or c.leg.disconnected for c in (sess.caller, sess.agent)):
                self.sessions.pop(sess.ref, None)
            self.schedule_load()

    def _answer_caller(self, sess: Session) -> None:
        pj = pjsua.load()
        caller = sess.caller
        if sess.closing or caller.leg.disconnected or caller.leg.answered:
            return
        op = pj.CallOpParam()
        op.statusCode = 200
        try:
            caller.answer(op)
            caller.leg.answered = True
        except pj.Error as e:
            log(f"{sess.ref}: answering the caller failed: {e.info()}")
            self.finish(sess, "error", detail=f"answer failed: {e.reason}")

    def _on_media(self, call: Any, ci: Any) -> None:
        pj = pjsua.load()
        sess: Session | None = call.sess
        leg: _Leg = call.leg
        for i, m in enumerate(ci.media):
            if m.type != pj.PJMEDIA_TYPE_AUDIO:
                continue
            leg.on_hold = m.status in (pj.PJSUA_CALL_MEDIA_REMOTE_HOLD, pj.PJSUA_CALL_MEDIA_LOCAL_HOLD)
            if m.status in (pj.PJSUA_CALL_MEDIA_ACTIVE, pj.PJSUA_CALL_MEDIA_REMOTE_HOLD):
                leg.media_idx = i
                leg.last_rx = time.monotonic()
                break
        if sess is None or sess.closing or leg.media_idx is None:
            return
        if sess.started:
            self._connect(sess)  # a re-INVITE may have rebuilt the stream: connect again
        else:
            self._maybe_start(sess)

    def _audio_media(self, call: Any) -> Any:
        if call is None or call.leg.disconnected or call.leg.media_idx is None:
            return None
        try:
            return call.getAudioMedia(call.leg.media_idx)
        except pjsua.load().Error:
            return None

    def _maybe_start(self, sess: Session) -> None:
        caller_am = self._audio_media(sess.caller)
        if caller_am is None or (sess.target and self._audio_media(sess.agent) is None):
            return
        sess.codec = pjsua.stream_codec(sess.caller, sess.caller.leg.media_idx)
        legs = ["caller", "agent"] if sess.target and self.cfg.transcribe_agent else ["caller"]
        fmt = pjsua.pcm16_format(16000)
        for i in range(len(legs)):
            if self.spare_captures:
                cap = self.spare_captures.pop()
            else:
                cap = self.Capture()
                cap.createPort(f"w{self.wid}-capture{self.captures_made}", fmt)
                self.captures_made += 1
            cap.attach(sess, i)
            sess.captures.append(cap)
        sess.started = True
        self.send({"type": "call_started", "call": sess.ref, "legs": legs, "sip": sess.sip,
                   "codec": sess.codec, "target": sess.target})
        self._connect(sess)
        log(f"{sess.ref}: call started ({sess.codec}{', bridged to ' + sess.target if sess.target else ''})")

    def _connect(self, sess: Session) -> None:
        pj = pjsua.load()
        caller_am, agent_am = self._audio_media(sess.caller), self._audio_media(sess.agent)
        try:
            for cap in sess.captures:
                am = caller_am if cap.leg == 0 else agent_am
                if am is not None:
                    am.startTransmit(cap)
            if caller_am is not None and agent_am is not None:
                caller_am.startTransmit(agent_am)
                agent_am.startTransmit(caller_am)
        except pj.Error as e:
            log(f"{sess.ref}: connecting audio failed: {e.info()}")
            self.finish(sess, "error", detail=f"audio connect failed: {e.reason}")

    def _on_dtmf(self, call: Any, prm: Any) -> None:
        sess: Session | None = call.sess
        if sess is None or sess.closing or not sess.started:
            return
        leg = call.leg.index
        is_end = bool(prm.flags & DTMF_IS_END)
        is_update = bool(prm.flags & DTMF_IS_UPDATE)
        open_ = sess.dtmf_open.get(leg)
        if open_ is not None and (open_[0] != prm.digit or (not is_update and not is_end)):
            self._send_dtmf(sess, leg, open_[0], 0, open_[1])  # its end was lost
            sess.dtmf_open.pop(leg, None)
            open_ = None
        if is_end:
            at = open_[1] if open_ else time.time() - prm.duration / 1000.0
            sess.dtmf_open.pop(leg, None)
            self._send_dtmf(sess, leg, prm.digit, int(prm.duration), at)
        elif open_ is None:
            sess.dtmf_open[leg] = (prm.digit, time.time())

    def _send_dtmf(self, sess: Session, leg: int, digit: str, duration_ms: int, at: float) -> None:
        self.send({"type": "dtmf", "call": sess.ref, "leg": leg, "digit": digit,
                   "duration_ms": duration_ms, "at": round(at, 3)})

    # ---------------------------------------------------------------- ending calls

    def _hangup_leg(self, call: Any, code: int, bye_reason: str = "") -> None:
        pj = pjsua.load()
        if call is None or call.leg.disconnected or call.leg.hanging_up:
            return
        call.leg.hanging_up = True
        op = pj.CallOpParam()
        # BYE once answered; before that the UAS leg is rejected with `code`, the UAC leg cancelled
        op.statusCode = code if (call.leg.index == 0 and not call.leg.answered) else (
            200 if call.leg.answered else 487)
        if bye_reason and call.leg.answered:
            h = pj.SipHeader()
            h.hName, h.hValue = "Reason", f'SIP;cause=200;text="{bye_reason}"'
            op.txOption.headers.append(h)
        try:
            call.hangup(op)
        except pj.Error as e:
            log(f"hangup failed: {e.info()}")

    def finish(self, sess: Session, reason: str, sip_code: int | None = None, detail: str = "",
               unanswered_code: int = 480, bye_reason: str = "") -> None:
        """End a session once: stop its audio, tell the service, hang up whatever leg is still up."""
        if sess.closing:
            return
        sess.closing = True
        for cap in sess.captures:
            cap.closed = True
        for leg, (digit, at) in list(sess.dtmf_open.items()):
            self._send_dtmf(sess, leg, digit, 0, at)
        sess.dtmf_open.clear()
        # queued after the frames the media thread already handed over, so none is lost or reordered
        self.loop.call_soon(self._send_ended, sess, reason, sip_code, detail)
        self._hangup_leg(sess.caller, unanswered_code, bye_reason)
        self._hangup_leg(sess.agent, unanswered_code, bye_reason)
        for cap in sess.captures:
            am = self._audio_media(sess.caller if cap.leg == 0 else sess.agent)
            if am is not None:
                try:
                    am.stopTransmit(cap)
                except pjsua.load().Error:
                    pass  # the call's media is already gone from the bridge
        self._bury(*sess.captures)
        if all(c is None or c.leg.disconnected for c in (sess.caller, sess.agent)):
            self.sessions.pop(sess.ref, None)
        log(f"{sess.ref}: call ended ({reason}{': ' + detail if detail else ''})")

    def _send_ended(self, sess: Session, reason: str, sip_code: int | None, detail: str) -> None:
        sess.ended = True
        self.send({"type": "call_ended", "call": sess.ref, "reason": reason, "sip_code": sip_code,
                   "detail": detail})
        self.schedule_load()

    def _bury(self, *objs: Any) -> None:
        """Keep pjsua2 objects a little longer: a Call deleted inside its own callback can crash
        the process, and a capture port may still get a frame queued before its stopTransmit.
        Only this list holds them (no timer handles), so _destroy can drop every reference before
        libDestroy."""
        until = time.monotonic() + 2.0
        self.graveyard.extend((until, o) for o in objs)

    def _prune(self) -> None:
        """Free expired Calls; expired capture ports go back to the spare list, since freeing one
        while the media clock runs races with its frame callback."""
        now = time.monotonic()
        if self.graveyard and self.graveyard[0][0] <= now:
            keep = []
            for t, o in self.graveyard:
                if t > now:
                    keep.append((t, o))
                elif isinstance(o, self.Capture):
                    o.sess = None
                    self.spare_captures.append(o)
                    log(f"capture port recycled ({len(self.spare_captures)} spare)")
            self.graveyard = keep

    def _monitor(self) -> None:
        """RTP inactivity: a leg whose received packet count has not moved for rtp_timeout_s."""
        pj = pjsua.load()
        now = time.monotonic()
        for sess in list(self.sessions.values()):
            if sess.closing or not sess.started:
                continue
            for call in (sess.caller, sess.agent):
                if call is None or call.leg.disconnected or call.leg.media_idx is None:
                    continue
                leg = call.leg
                try:
                    pkt = int(call.getStreamStat(leg.media_idx).rtcp.rxStat.pkt)
                except pj.Error:
                    continue
                if pkt != leg.rx_pkt or leg.on_hold:
                    leg.rx_pkt, leg.last_rx = pkt, now
                elif now - leg.last_rx >= self.cfg.rtp_timeout_s:
                    name = "caller" if leg.index == 0 else "agent"
                    self.finish(sess, "rtp_timeout", detail=f"no RTP from the {name} for {now - leg.last_rx:.1f} s")
                    break

    # ---------------------------------------------------------------- main loop

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        try:
            reader, self.writer = await asyncio.wait_for(asyncio.open_unix_connection(self.control), 10.0)
        except (TimeoutError, OSError) as e:
            log(f"cannot connect to the control socket {self.control}: {e}")
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_stop, f"signal {sig.name}")
        try:
            self.start_sip()
        except (pjsua.load().Error, ValueError, OSError) as e:  # pjsua2.Error carries the detail in info()
            msg = e.info() if hasattr(e, "info") else str(e)
            log(f"cannot start SIP on {self.host}:{self.port}: {msg}")
            self.send({"type": "log", "level": "error", "event": "sip_worker_start_failed", "error": msg[:500]})
            await self._drain()
            if hasattr(self, "ep"):
                self._destroy()
            return 1
        self.send({"type": "hello", "worker": self.wid, "sip_port": self.port, "max_calls": self.cfg.max_calls,
                   "pid": os.getpid()})
        self.schedule_load()
        ctl = asyncio.create_task(self._read_control(reader))
        next_monitor = time.monotonic() + MONITOR_S
        try:
            while not self.stopping.is_set():
                self.ep.libHandleEvents(0)
                if self.slots_used() != self._slots_reported:
                    self.schedule_load()  # e.g. a hung-up call's slot freed once its BYE completed
                if time.monotonic() >= next_monitor:
                    next_monitor += MONITOR_S
                    if os.getppid() != self.parent:  # reparented: the service died
                        self.request_stop("the service process is gone")
                    self._monitor()
                    self._prune()
                await asyncio.sleep(POLL_S)
            log(f"stopping: {self.stop_reason}")
            await self._hang_up_all()
        finally:
            ctl.cancel()
            await self._drain()
            self._destroy()
        return 0

    async def _hang_up_all(self) -> None:
        live = [s for s in self.sessions.values() if not s.closing]
        for sess in live:
            self.finish(sess, "shutdown", detail=self.stop_reason, unanswered_code=503)
        start = time.monotonic()
        deadline = start + SHUTDOWN_WAIT_S
        # pjsua reports a hung-up call DISCONNECTED at once, but its BYE may still be waiting for the
        # caller's ACK (a call answered a moment ago) or for a retransmission: keep the SIP stack
        # running a little longer, since libDestroy(NO_NETWORK) sends nothing more.
        grace = start + SHUTDOWN_GRACE_S if live or self.alive else start
        while (self.alive or time.monotonic() < grace) and time.monotonic() < deadline:
            self.ep.libHandleEvents(0)
            await asyncio.sleep(POLL_S)
        if self.alive:
            log(f"{len(self.alive)} call(s) still up after {SHUTDOWN_WAIT_S:g} s; destroying anyway")
        await asyncio.sleep(0)  # let the queued call_ended/load messages go out

    async def _drain(self) -> None:
        w = self.writer
        if w is None:
            return
        try:
            if not w.is_closing():
                await asyncio.wait_for(w.drain(), 2.0)
            w.close()
            await asyncio.wait_for(w.wait_closed(), 2.0)
        except (TimeoutError, OSError, ConnectionError):
            pass
        self._closed = True

    def _destroy(self) -> None:
        pjsua.stop_media_clock(self.ep, log)  # before any capture port is freed
        log(f"{self.captures_made} capture port(s) served {self.seq} call(s)")
        objs = [o for _, o in self.graveyard] + list(self.alive) + self.spare_captures
        for sess in self.sessions.values():
            objs += [sess.caller, sess.agent, *sess.captures]
        for o in objs:  # break Session <-> Call/Capture cycles so gc frees them now
            if o is not None:
                o.closed = True
                o.sess = None
        objs.clear()
        o = None
        self.sessions.clear()
        self.alive.clear()
        self.graveyard.clear()
        self.spare_captures.clear()
        self.acc = None
        gc.collect()
        pjsua.destroy_endpoint(self.ep, self._keep, log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sip.worker", description="pjsua2 SIP worker (see module docstring)")
    p.add_argument("--id", type=int, required=True, help="worker number (call refs are w<id>-<n>)")
    p.add_argument("--host", default="127.0.0.1", help="SIP and RTP bind address")
    p.add_argument("--port", type=int, required=True, help="SIP port (UDP and TCP)")
    p.add_argument("--control", required=True, help="the service's Unix socket")
    p.add_argument("--config-json", default="{}", help="worker settings as a JSON object")
    p.add_argument("--parent-pid", type=int, default=0, help="the service's pid: exit when it is gone (default: ours)")
    args = p.parse_args(argv)
    parent = args.parent_pid or os.getppid()
    if not die_with_parent(parent):
        log(f"the service (pid {parent}) is already gone; exiting")
        return 1
    try:
        cfg = WorkerConfig.from_json(args.config_json)
    except (ValueError, TypeError) as e:
        log(f"bad --config-json: {e}")
        return 2
    os.dup2(2, 1)  # pjsua2 prints to stdout; everything goes to stderr
    worker = Worker(args.id, args.host, args.port, args.control, cfg, parent)
    return asyncio.run(worker.run())


if __name__ == "__main__":
    sys.exit(main())
