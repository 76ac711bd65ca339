"""SIP ingress: pjsua2 worker processes, the dispatcher in front of them, and their calls as jobs.

The pjsua2 wheel holds at most 4 calls per process, so calls are answered by `sip.workers` worker
processes (sip/worker.py), each on its own SIP port; the dispatcher (sip/dispatcher.py) owns the
public SIP port and spreads INVITEs over them by load. Workers stream each leg's audio here over
a Unix socket (sip/protocol.py); this adapter turns a worker call into a Call (source `sip`,
legs `caller` and, when bridged, `agent`) exactly like a stream session, and enforces the
maximum duration by asking the worker to hang up.

A worker that dies takes its calls with it: their jobs end `failed` with what was received, and
the worker is restarted. Workers die with the service (sip/worker.py); what a killed service left
anyway (workers in the pid file of its data dir, control-socket directories) is cleared at start
(sip/leftovers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from aiohttp import web

from bridge.calls import Call
from bridge.config import Config
from bridge.events.types import Dtmf
from bridge.ingress.base import Unavailable
from bridge.jobs.model import JobSource
from bridge.logs import bind_job, get_logger
from bridge.recognizer.streamer import StreamerConfig
from bridge.sessions import ErrorCode, SessionError, Ticket, failure_error
from sip import PJSUA2_HINT, pjsua2_missing
from sip.dispatcher import Dispatcher, InviteRefused, TcpLimits, Worker
from sip.leftovers import ProcessId, WorkerPidFile, make_sock_dir, remove_dead_sock_dirs, stop_stale_workers
from sip.message import SipMessage
from sip.ports import free_sip_port
from sip.protocol import MessageError, encode, read_message
from sip.routing import Router, parse_routes

if TYPE_CHECKING:
    from bridge.service import Service

__all__ = ["SipIngress", "invite_refusal"]

log = get_logger("bridge.ingress.sip")
ROOT = Path(__file__).resolve().parents[2]
RTP_BLOCK = 100  # RTP ports per worker
HELLO_TIMEOUT_S = 30.0
RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10)
CREDITS_HINT = "add credits to the key, or lower limits.max_duration_s (what each SIP call reserves)"


def invite_refusal(err: SessionError, retry_after_full: int, retry_after_draining: int) -> InviteRefused:
    """The SIP final response to an INVITE the session layer refused (docs/sip.md, "Admission"):
    402 Payment Required for the owner's credits, 486 Busy Here for its session limit (this owner is
    busy; retrying elsewhere does not help), 503 Service Unavailable with Retry-After when the server
    is (disk, decode capacity, shutdown). Each with a Warning carrying the message."""
    if err.code is ErrorCode.INSUFFICIENT_CREDITS:
        return InviteRefused(err.message, None, status=402, reason="Payment Required")
    if err.code is ErrorCode.RATE_LIMITED and not err.server_busy:
        return InviteRefused(err.message, None, status=486)
    if err.code is ErrorCode.UPSTREAM_ERROR:  # shutting down: as the dispatcher answers once draining
        return InviteRefused(err.message, retry_after_draining)
    return InviteRefused(err.message, err.retry_after_s if err.retry_after_s is not None else retry_after_full)


@dataclass
class _Worker:
    id: int
    port: int
    rtp_port_start: int
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    hello: asyncio.Event = field(default_factory=asyncio.Event)
    calls: dict[str, "_SipCall"] = field(default_factory=dict)
    restarts: int = 0
    stopping: bool = False
    stderr_task: asyncio.Task | None = None
    start_error: str = ""  # the worker's last "cannot start SIP" line (port in use, ...)
    watch_task: asyncio.Task | None = None

    async def send(self, header: dict[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(encode(header))
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()


@dataclass
class _SipCall:
    ref: str
    worker: _Worker
    call: Call
    timers: list[asyncio.Task] = field(default_factory=list)
    ended_by: str | None = None
    error: SessionError | None = None  # when the call failed under us


class _InviteHold:
    """What the dispatcher keeps for an admitted INVITE: the session's Ticket, findable by the
    INVITE's Call-ID until the worker's call_started claims it."""

    def __init__(self, pending: dict[str, list["_InviteHold"]], call_id: str, ticket: Ticket) -> None:
        self.pending = pending
        self.call_id = call_id
        self.ticket = ticket
        self.claimed = False  # the worker's call_started took the ticket: the session layer owns it now
        pending.setdefault(call_id, []).append(self)

    def forget(self) -> None:
        holds = self.pending.get(self.call_id, [])
        if self in holds:
            holds.remove(self)
        if not holds:
            self.pending.pop(self.call_id, None)

    def release(self) -> None:
        """The INVITE is done with it: failed (all undone) or, once claimed, nothing to do here: the
        call being opened owns the ticket (`SessionGate.open` releases its capacity when registered;
        releasing it here while the job is being created would cancel a call about to go live)."""
        self.forget()
        if not self.claimed:
            self.ticket.release()


class SipIngress:
    """The SIP gateway as an ingress (bridge/ingress/base.py): no HTTP routes; its calls are
    admitted by the session layer when the dispatcher screens their INVITE (`_admit_invite`)."""

    source: ClassVar[JobSource] = JobSource.SIP

    def __init__(self, service: "Service") -> None:
        self.svc = service
        self.cfg = service.config.sip
        self.host = service.config.server.host
        self.port = service.config.server.sip_port
        self.workers: list[_Worker] = []
        self.dispatcher: Any = None
        self._server: asyncio.AbstractServer | None = None
        self._sock_dir: str | None = None
        self._pid_file: WorkerPidFile | None = None
        self.sock_path = ""
        self.worker_host = "127.0.0.1"
        self.listening = False
        self._closing = False
        self._admitted: dict[str, list[_InviteHold]] = {}  # Call-ID -> admitted INVITEs awaiting their call

    @staticmethod
    def enabled(config: Config) -> bool:
        return config.sip.enabled

    @staticmethod
    def unavailable() -> Unavailable | None:
        """pjsua2 is a Python 3.11 wheel: elsewhere the service runs without SIP."""
        why = pjsua2_missing()
        return (why, f"{PJSUA2_HINT}, or set CALLBRIDGE_SIP_ENABLED=false") if why else None

    @staticmethod
    def routes() -> list[web.RouteDef]:
        return []

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        router = Router.from_config(self.cfg)  # a bad route fails the start, naming the entry
        self._pid_file = WorkerPidFile(self.svc.data_dir)
        await stop_stale_workers(self._pid_file, log)  # a killed service's workers hold our ports
        remove_dead_sock_dirs(log)
        self._sock_dir = make_sock_dir()  # Unix socket paths max out at 108 bytes
        self.sock_path = os.path.join(self._sock_dir, "control.sock")
        self._server = await asyncio.start_unix_server(self._on_worker, path=self.sock_path)
        base = self.cfg.worker_base_port or (self.port + 1 if self.port else 0)
        wk_host = self.worker_host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        for i in range(self.cfg.workers):
            port = base + i if base else free_sip_port(wk_host)
            self.workers.append(_Worker(i, port, self.cfg.rtp_port_start + i * RTP_BLOCK))
        self.dispatcher = Dispatcher(
            self.host, self.port, [Worker(id=w.id, host=wk_host, port=w.port, capacity=self.cfg.calls_per_worker)
                                   for w in self.workers],
            router, codecs=tuple(self.cfg.codecs), public_address=self.cfg.public_address or None, logger=log,
            admission=self._admit_invite,
            tcp_idle_timeout=self.cfg.tcp_idle_timeout_s, tcp_limits=TcpLimits(
                self.cfg.tcp_max_connections, self.cfg.tcp_max_connections_per_source,
                self.cfg.tcp_max_message_bytes, self.cfg.tcp_message_timeout_s))
        await self.dispatcher.start()
        self.port = self.dispatcher.port
        await asyncio.gather(*(self._spawn(w) for w in self.workers))
        try:
            await asyncio.wait_for(asyncio.gather(*(w.hello.wait() for w in self.workers)), HELLO_TIMEOUT_S)
        except asyncio.TimeoutError:
            missing = [w for w in self.workers if not w.hello.is_set()]
            why = "; ".join(f"worker {w.id}: {w.start_error}" for w in missing if w.start_error)
            raise RuntimeError(f"SIP workers {[w.id for w in missing]} did not start within {HELLO_TIMEOUT_S:g} s"
                               + (f" ({why})" if why else "")) from None
        self.listening = True
        log.info("sip_listening", host=self.host, port=self.port, workers=len(self.workers),
                 capacity=len(self.workers) * self.cfg.calls_per_worker)

    async def _admit_invite(self, slots: int, invite: SipMessage) -> _InviteHold:
        """Asked by the dispatcher before an INVITE goes to a worker: the session layer admits the
        call for its owner (`_owner`) like any session (disk reserve, the owner's session limit,
        decode capacity for its transcribed legs, credits for `limits.max_duration_s` x those legs),
        or refuses it with the SIP answer `invite_refusal` picks. The hold keeps all of it until
        `_start_call` claims it for the worker's call (then only the capacity hold is released: its
        legs count as live) or the INVITE fails (then everything is given back), so INVITEs
        arriving together cannot all pass on the same counts."""
        legs = slots if self.cfg.transcribe_agent else 1
        try:
            ticket = await self.svc.sessions.admit(await self._owner(), legs, self.svc.config.limits.max_duration_s,
                                                   JobSource.SIP, hint=CREDITS_HINT)
        except SessionError as e:
            self.svc.metrics.errors.labels(e.code.value).inc()  # as stream and WebRTC count theirs
            log.info("sip_invite_refused", code=e.code.value, message=e.message, sip_call_id=invite.call_id)
            raise invite_refusal(e, self.dispatcher.retry_after_full, self.dispatcher.retry_after_draining) from None
        return _InviteHold(self._admitted, invite.call_id or "", ticket)

    async def _claim(self, call_id: str | None, legs: int) -> Ticket | None:
        """The admitted INVITE's ticket for a call the worker started, if the dispatcher admitted one.
        None for a call that reached the worker directly (a proxy such as Kamailio in front):
        that call is admitted now, without a capacity check (it is answered already)."""
        for hold in list(self._admitted.get(call_id or "", ())):
            if not hold.ticket.cancelled and not hold.ticket.opened:
                hold.claimed = True
                hold.forget()
                return hold.ticket
        try:
            return await self.svc.sessions.admit(await self._owner(), legs, self.svc.config.limits.max_duration_s,
                                                 JobSource.SIP, hint=CREDITS_HINT, capacity=False)
        except SessionError as e:
            self.svc.metrics.errors.labels(e.code.value).inc()
            log.info("sip_call_refused", code=e.code.value, message=e.message, sip_call_id=call_id)
            return None

    def _worker_config(self, w: _Worker) -> dict[str, Any]:
        return {"rtp_port_start": w.rtp_port_start, "codecs": list(self.cfg.codecs),
                "routes": parse_routes(self.cfg.routes), "target_header": self.cfg.target_header,
                "allow_target_header": self.cfg.allow_target_header, "transcribe_agent": self.cfg.transcribe_agent,
                "rtp_timeout_s": self.cfg.rtp_timeout_s, "max_calls": self.cfg.calls_per_worker,
                "public_address": self.cfg.public_address or self.host}

    async def _spawn(self, w: _Worker) -> None:
        w.hello.clear()
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sip.worker", "--id", str(w.id), "--host", self.worker_host, "--port", str(w.port),
            "--control", self.sock_path, "--config-json", json.dumps(self._worker_config(w)),
            "--parent-pid", str(os.getpid()),
            cwd=str(ROOT), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        self._record_pids()
        w.stderr_task = asyncio.create_task(self._pipe_stderr(w, w.proc))
        w.watch_task = asyncio.create_task(self._watch(w, w.proc))
        log.info("sip_worker_spawned", worker=w.id, pid=w.proc.pid, sip_port=w.port)

    def _record_pids(self) -> None:
        procs = [ProcessId.of(w.proc.pid) for w in self.workers if w.proc is not None and w.proc.returncode is None]
        try:
            self._pid_file.write(self.sock_path, [p for p in procs if p is not None])
        except OSError as e:
            log.warning("sip_pid_file_unwritable", path=str(self._pid_file.path), error=str(e))

    async def _pipe_stderr(self, w: _Worker, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            text = line.decode(errors="replace").rstrip()
            if text:
                log.debug("sip_worker_output", worker=w.id, line=text[:500])
                if "cannot start SIP" in text:
                    w.start_error = text[:300]

    async def _watch(self, w: _Worker, proc: asyncio.subprocess.Process) -> None:
        """Restart a worker that exits on its own; its calls' jobs end failed, audio kept."""
        rc = await proc.wait()
        if w.stopping or self._closing:
            return
        log.error("sip_worker_exited", worker=w.id, returncode=rc, live_calls=len(w.calls))
        if self.dispatcher is not None:
            self.dispatcher.set_alive(w.id, False)
        for sc in list(w.calls.values()):
            await self._end(sc, "worker_exited",
                            SessionError(ErrorCode.INTERNAL, f"SIP worker {w.id} exited (code {rc}) during the call"))
        delay = RESTART_BACKOFF_S[min(w.restarts, len(RESTART_BACKOFF_S) - 1)]
        w.restarts += 1
        await asyncio.sleep(delay)
        if not self._closing:
            await self._spawn(w)

    async def drain(self, timeout_s: float) -> None:
        """No new calls; hang up live ones (their jobs complete with everything received)."""
        if self.dispatcher is not None:
            self.dispatcher.draining = True
        for w in self.workers:
            for sc in list(w.calls.values()):
                sc.ended_by = sc.ended_by or "shutdown"
                await w.send({"type": "hangup", "call": sc.ref, "reason": "shutdown"})

    async def stop(self) -> None:
        self._closing = True
        self.listening = False
        for w in self.workers:
            w.stopping = True
            await w.send({"type": "shutdown"})
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                try:
                    await asyncio.wait_for(w.proc.wait(), 10)
                except asyncio.TimeoutError:
                    log.warning("sip_worker_killed", worker=w.id, pid=w.proc.pid)
                    w.proc.kill()
                    await w.proc.wait()
            for sc in list(w.calls.values()):
                await self._end(sc, sc.ended_by or "shutdown", None)
            for t in (w.stderr_task, w.watch_task):
                if t is not None:
                    t.cancel()
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._sock_dir:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
        if self._pid_file is not None and all(w.proc is None or w.proc.returncode is not None for w in self.workers):
            self._pid_file.remove()

    # -- worker connections --------------------------------------------------------------------
    async def _on_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        w: _Worker | None = None
        try:
            first = await asyncio.wait_for(read_message(reader), HELLO_TIMEOUT_S)
            if first is None or first[0].get("type") != "hello" or not isinstance(first[0].get("worker"), int):
                log.error("sip_worker_bad_hello", message=str(first)[:200])
                return
            wid = first[0]["worker"]
            if not 0 <= wid < len(self.workers):
                log.error("sip_worker_unknown", worker=wid)
                return
            w = self.workers[wid]
            w.writer = writer
            w.hello.set()
            self.dispatcher.set_load(wid, 0)
            self.dispatcher.set_alive(wid, True)
            log.info("sip_worker_ready", worker=wid, pid=first[0].get("pid"), sip_port=first[0].get("sip_port"))
            while True:
                msg = await read_message(reader)
                if msg is None:
                    break
                await self._handle(w, *msg)
        except (MessageError, asyncio.TimeoutError, ConnectionError) as e:
            log.error("sip_worker_channel_error", worker=w.id if w else None, error=str(e))
        finally:
            if w is not None and w.writer is writer:
                w.writer = None
                if self.dispatcher is not None:
                    self.dispatcher.set_alive(w.id, False)
            writer.close()

    async def _handle(self, w: _Worker, h: dict[str, Any], payload: bytes) -> None:
        kind = h["type"]
        if kind == "audio":
            sc = w.calls.get(h.get("call", ""))
            if sc is not None and len(payload) >= 2:
                leg = int(h.get("leg", 0))
                if 0 <= leg < sc.call.channels:
                    # a read-only view: the recorder and the recognizer copy what they keep
                    sc.call.feed_leg(leg, np.frombuffer(payload, dtype="<i2", count=len(payload) // 2))
        elif kind == "call_started":
            await self._start_call(w, h)
        elif kind == "call_ended":
            sc = w.calls.get(h.get("call", ""))
            if sc is not None:
                reason = sc.ended_by or h.get("reason", "hangup")
                await self._end(sc, reason, sc.error, sip_code=h.get("sip_code"))
        elif kind == "dtmf":
            sc = w.calls.get(h.get("call", ""))
            if sc is not None:
                leg = int(h.get("leg", 0))
                leg = leg if 0 <= leg < sc.call.channels else 0
                at = sc.call.leg_samples[leg] / 16000
                sc.call.publish(Dtmf(str(h.get("digit", "?")), leg, sc.call.job.speakers[leg], at,
                                     int(h.get("duration_ms", 0))))
        elif kind == "load":
            self.dispatcher.set_load(w.id, int(h.get("slots_used", h.get("calls", 0))))
        elif kind == "log":
            log.info("sip_worker_log", worker=w.id, **{k: v for k, v in h.items() if k != "type"})

    async def _owner(self) -> str:
        if self.cfg.owner_key:
            return self.cfg.owner_key
        keys = [k for k in await self.svc.keys.list_keys() if not k.revoked]
        return keys[0].id if keys else "sip"

    async def _start_call(self, w: _Worker, h: dict[str, Any]) -> None:
        ref = str(h.get("call"))
        legs = [str(x) for x in (h.get("legs") or ["caller"])]
        sip_meta = dict(h.get("sip") or {})
        svc = self.svc
        ticket = await self._claim(sip_meta.get("call_id"), len(legs))
        if ticket is None:  # refused (answered directly by the worker): no job
            await w.send({"type": "hangup", "call": ref, "reason": "refused"})
            return
        streamer = StreamerConfig(**svc.config.recognizer.streamer_kwargs())
        call = svc.sessions.new_call(
            ticket, config={"codec": h.get("codec"), "target": h.get("target"), "worker": w.id,
                            "endpointing_ms": streamer.endpointing_ms, "language": streamer.language},
            speakers=legs, metadata={"sip": sip_meta}, streamer=streamer)
        sc = _SipCall(ref, w, call)
        w.calls[ref] = sc  # before open(): audio may follow call_started at once
        with bind_job(call.id):
            try:
                await svc.sessions.open(ticket, call, subscribe=False)
            except Exception:
                w.calls.pop(ref, None)
                self.dispatcher.release_invite(sip_meta.get("call_id"))
                log.exception("sip_call_open_failed", worker=w.id, call=ref)
                await w.send({"type": "hangup", "call": ref, "reason": "request"})
                return
            self.dispatcher.release_invite(sip_meta.get("call_id"))  # its legs count as live from now
            call.log.info("sip_call_started", worker=w.id, call=ref, legs=legs, sip_call_id=sip_meta.get("call_id"),
                          from_=sip_meta.get("from"), target=h.get("target"))
            sc.timers.append(asyncio.create_task(self._max_duration(sc)))
            sc.timers.append(asyncio.create_task(self._stop_on_drain(sc)))
            sc.timers.append(asyncio.create_task(self._hang_up_on_failure(sc)))

    async def _max_duration(self, sc: _SipCall) -> None:
        await asyncio.sleep(self.svc.config.limits.max_duration_s)
        sc.ended_by = "max_duration"
        sc.call.log.info("sip_max_duration", seconds=self.svc.config.limits.max_duration_s)
        await sc.worker.send({"type": "hangup", "call": sc.ref, "reason": "max_duration"})

    async def _stop_on_drain(self, sc: _SipCall) -> None:
        await sc.call.stop_requested.wait()
        sc.ended_by = sc.ended_by or "shutdown"
        await sc.worker.send({"type": "hangup", "call": sc.ref, "reason": "shutdown"})

    async def _hang_up_on_failure(self, sc: _SipCall) -> None:
        """The call failed under us (the disk filled): hang up; the job ends failed with its error."""
        assert sc.call.failure is not None
        exc = await sc.call.failure
        sc.error = failure_error(exc)
        sc.ended_by = sc.ended_by or sc.error.code.value.lower()
        sc.call.log.info("sip_call_failed", code=sc.error.code.value)
        await sc.worker.send({"type": "hangup", "call": sc.ref, "reason": "request"})

    async def _end(self, sc: _SipCall, reason: str, error: SessionError | None, sip_code: int | None = None) -> None:
        """The call is over: the job saved (failed if `error`), its credits settled to the audio received."""
        if sc.worker.calls.pop(sc.ref, None) is None:
            return
        for t in sc.timers:
            t.cancel()
        call = sc.call
        with bind_job(call.id):
            try:
                try:  # the job's end matters more than its metadata: a full disk must not leave it live
                    await call.annotate(ended_by=reason, **({"sip_code": sip_code} if sip_code else {}))
                except Exception as e:  # noqa: BLE001
                    call.log.error("sip_call_annotate_failed", reason=reason, error=repr(e))
                await self.svc.sessions.conclude(call, error)
            finally:
                self.svc.sessions.leave(call)
        call.log.info("sip_call_ended", reason=reason, status=call.job.status.value, t=round(time.time(), 3))

    def stats(self) -> dict[str, Any]:
        return {"port": self.port, "listening": self.listening,
                "workers": [{"id": w.id, "port": w.port, "alive": w.writer is not None, "calls": len(w.calls),
                             "restarts": w.restarts} for w in self.workers],
                "dispatcher": self.dispatcher.stats() if self.dispatcher else {}}
