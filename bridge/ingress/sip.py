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
from typing import TYPE_CHECKING, Any

import numpy as np

from bridge.admission import CapacityRefused, Reservation
from bridge.calls import Call
from bridge.events.types import Dtmf
from bridge.ingress.stream import ErrorCode, failure_error
from bridge.jobs.model import Job, JobSource, JobStatus, new_job_id
from bridge.logs import bind_job, get_logger
from bridge.recognizer.streamer import StreamerConfig
from sip.dispatcher import Dispatcher, InviteRefused, TcpLimits, Worker
from sip.leftovers import ProcessId, WorkerPidFile, make_sock_dir, remove_dead_sock_dirs, stop_stale_workers
from sip.ports import free_sip_port
from sip.protocol import MessageError, encode, read_message

if TYPE_CHECKING:
    from bridge.service import Service

__all__ = ["SipIngress"]

log = get_logger("bridge.ingress.sip")
ROOT = Path(__file__).resolve().parents[2]
RTP_BLOCK = 100  # RTP ports per worker
HELLO_TIMEOUT_S = 30.0
RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10)


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
    error: dict[str, Any] | None = None  # {"code", "message"} when the call failed under us


class SipIngress:
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

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        from sip.routing import Router

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

    def _admit_invite(self, slots: int) -> Reservation:
        """Asked by the dispatcher before an INVITE goes to a worker. Refuses it (InviteRefused: 503)
        while the data directory is under its free-space reserve (bridge/storage.py) or when the
        decode pool has no room for its legs (bridge/admission.py); else reserves those legs. The
        INVITE holds them until `_start_call` registers its call (a SIP leg counts as live only
        from the worker's call_started) or the INVITE fails, so INVITEs arriving together cannot
        all pass on the same count."""
        disk_full = self.svc.storage.refusal()
        if disk_full is not None:
            self.svc.metrics.errors.labels(ErrorCode.STORAGE_FULL.value).inc()  # as stream and WebRTC count theirs
            raise InviteRefused(disk_full, self.dispatcher.retry_after_full)
        assert self.svc.admission is not None, "the service is not started"
        try:
            return self.svc.admission.reserve(slots if self.cfg.transcribe_agent else 1)
        except CapacityRefused as e:
            self.svc.metrics.capacity_refused.labels(JobSource.SIP.value).inc()
            raise InviteRefused(e.reason, e.retry_after_s) from None

    def _worker_config(self, w: _Worker) -> dict[str, Any]:
        from sip.routing import parse_routes

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
            await self._end(sc, JobStatus.FAILED, "worker_exited",
                            {"code": "INTERNAL", "message": f"SIP worker {w.id} exited (code {rc}) during the call"})
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
                await self._end(sc, JobStatus.COMPLETED, sc.ended_by or "shutdown", None)
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
                status = JobStatus.FAILED if sc.error else JobStatus.COMPLETED
                await self._end(sc, status, reason, sc.error, sip_code=h.get("sip_code"))
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
        streamer = StreamerConfig(**svc.config.recognizer.streamer_kwargs())
        job = Job(id=new_job_id(), owner=await self._owner(), source=JobSource.SIP,
                  config={"codec": h.get("codec"), "target": h.get("target"), "worker": w.id,
                          "endpointing_ms": streamer.endpointing_ms, "language": streamer.language},
                  speakers=legs, metadata={"sip": sip_meta})
        call = Call(job, store=svc.store, bus=svc.bus, pool=svc.pool, streamer_config=streamer,
                    recordings_dir=svc.recordings_dir, credits_per_minute=svc.config.credits.per_minute,
                    usage_interval_s=svc.config.credits.usage_interval_s, storage=svc.storage)
        sc = _SipCall(ref, w, call)
        w.calls[ref] = sc  # before open(): audio may follow call_started at once
        with bind_job(job.id):
            try:
                await call.open()
            except Exception:
                w.calls.pop(ref, None)
                self.dispatcher.release_invite(sip_meta.get("call_id"))
                log.exception("sip_call_open_failed", worker=w.id, call=ref)
                await w.send({"type": "hangup", "call": ref, "reason": "request"})
                return
            svc.calls.add(call, job.owner)
            self.dispatcher.release_invite(sip_meta.get("call_id"))  # its legs count as live from now
            svc.metrics.sessions.labels(JobSource.SIP.value).inc()
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
        sc.error = failure_error(exc).frame()
        sc.error.pop("type")
        sc.ended_by = sc.ended_by or sc.error["code"].lower()
        sc.call.log.info("sip_call_failed", code=sc.error["code"])
        await sc.worker.send({"type": "hangup", "call": sc.ref, "reason": "request"})

    async def _end(self, sc: _SipCall, status: JobStatus, reason: str, error: dict[str, Any] | None,
                   sip_code: int | None = None) -> None:
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
                await call.finish(status, error)
            finally:
                self.svc.calls.remove(call)
                self.svc.metrics.audio_seconds.labels(JobSource.SIP.value).inc(call.streamed_seconds * call.channels)
        call.log.info("sip_call_ended", reason=reason, status=status.value, t=round(time.time(), 3))

    def stats(self) -> dict[str, Any]:
        return {"port": self.port, "listening": self.listening,
                "workers": [{"id": w.id, "port": w.port, "alive": w.writer is not None, "calls": len(w.calls),
                             "restarts": w.restarts} for w in self.workers],
                "dispatcher": self.dispatcher.stats() if self.dispatcher else {}}
