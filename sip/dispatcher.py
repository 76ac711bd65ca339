"""The SIP dispatcher: the public SIP port (UDP and TCP) in front of the pjsua2 worker processes.

A pjsua2 process holds at most 4 calls, so `callbridge serve` runs several and this proxy spreads
new calls over them, the way Kamailio's dispatcher module does in production (call-load
algorithm with a max load per worker, 503 when everything is full, failover on 408/486/500/503
only when another worker can take the call, OPTIONS answered locally: 503 while draining or with
no worker running, so a front door probing the nodes takes this one out).

`Dispatcher` composes the parts, each in its own module:
- sip/transport.py: the UDP and TCP listeners, framing, TCP limits, sending;
- sip/transactions.py: what is remembered per transaction and dialog, expiry, retransmission timers;
- sip/proxy.py: forwarding INVITEs, CANCEL, ACK, in-dialog requests and responses, failover;
- sip/routing.py: the bridging decision (slots a call needs) and the worker pool (load, selection).
What stays here is the front door: checking each request, refusing what no worker should see
(malformed, no SDP offer or no common codec, draining, full), the service's admission check, and
the controls the service calls (`set_load`, `set_alive`, `release_invite`, `stats`).

The service's admission check (disk reserve, the owner's session limit and credits, decode
capacity) runs once per INVITE transaction and returns a hold on what it admitted; the INVITE
keeps it until the service reports its call registered (`release_invite`, on the worker's
call_started) or the INVITE ends otherwise (a non-2xx final response, the entry expiring or
evicted, shutdown), so INVITEs arriving together cannot all pass the check before any of their
calls counts as live. The check is awaited (it reserves the owner's credits in the store): the
INVITE is answered 100 Trying and recorded first, so retransmissions are absorbed and a CANCEL
arriving meanwhile ends it with 487 once the check is back (its hold given back).

Nothing a peer sends may take the service down: a bad packet is counted, logged (rate-limited)
and, where it parses far enough to be answered, answered with 400; the next packet is handled
normally. Not handled: TLS/WS transports, DNS names as response targets (Via `received` is always
an IP here), forking, authentication, Record-Route, and late-offer (body-less) INVITEs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sip.log import WarningLimiter, component_logger
from sip.message import (
    SipMessage,
    SipParseError,
    SipTooLarge,
    Via,
    common_codecs,
    make_response,
    name_addr_uri,
    sdp_audio_codecs,
)
from sip.proxy import FAILOVER_CODES, Proxy
from sip.routing import RouteError, Router, Worker, WorkerPool, call_slots
from sip.transactions import LINGER_S, PENDING_TTL_S, T1, Hold, InviteTransaction, TransactionTable, invite_key
from sip.transport import Origin, SipTransport, TcpLimits

__all__ = ["ALLOW", "FAILOVER_CODES", "Dispatcher", "Hold", "InviteRefused", "TcpLimits", "Worker"]

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, PRACK"
_KNOWN_NOT_ALLOWED = frozenset({"REGISTER", "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE", "REFER",
                                "INFO", "UPDATE", "PRACK"})
_NOT_AUDIO = frozenset({"telephone-event", "cn"})


class InviteRefused(Exception):
    """Raised by the admission check: answer the INVITE `status` (503 Service Unavailable unless
    given) with a Warning saying `why`, and Retry-After when `retry_after_s` is set."""

    def __init__(self, why: str, retry_after_s: int | None, *, status: int = 503, reason: str | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.retry_after_s = retry_after_s
        self.status = status
        self.reason = reason  # the reason phrase, when the status has none in sip.message.REASONS


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _warning(code: int, text: str) -> tuple[str, str]:
    return "Warning", f"{code} callbridge {_quote(text)}"


class Dispatcher:
    """Owns host:port (UDP and TCP) and spreads new calls over `workers` (see the module doc).

    `codecs` are the accepted codecs ("PCMU/8000", ...): an offer with none of them gets 488.
    `public_address` names this host as callers see it (only used to recognise a Route to us).
    `logger` is a structlog-style logger (the service passes its own; structlog's otherwise).
    `t1`, `worker_timeout` (no answer at all from a worker -> treated as 408, fail over),
    `dialog_ttl` and `max_entries` are tunables; the defaults suit production.
    """

    def __init__(self, host: str, port: int, workers: Sequence[Worker], router: Router, *,
                 codecs: tuple[str, ...] = ("PCMU/8000", "PCMA/8000", "G722/16000"),
                 public_address: str | None = None, logger: Any = None,
                 t1: float = T1, worker_timeout: float = 2.0, dialog_ttl: float = 4 * 3600.0,
                 retry_after_full: int = 5, retry_after_draining: int = 30,
                 max_entries: int = 50_000, tcp_idle_timeout: float = 900.0,
                 tcp_limits: TcpLimits | None = None,
                 admission: Callable[[int, SipMessage], Awaitable[Hold | None]] | None = None) -> None:
        if not codecs:
            raise ValueError("Dispatcher needs at least one accepted codec")
        self.pool = WorkerPool(workers)
        self.workers = self.pool.workers
        self.host = host
        self.router = router
        self.codecs = tuple(codecs)
        self.public_address = public_address
        self._log = component_logger(logger, "sip_dispatcher", "callbridge.sip.dispatcher")
        self._warn = WarningLimiter(self._log)
        self.retry_after_full = retry_after_full
        self.retry_after_draining = retry_after_draining
        self.draining = False
        # the service's admission check (disk reserve, session limit, decode capacity, credits):
        # (slots needed, the INVITE) -> a hold on what it admitted (or None), or InviteRefused
        self.admission = admission
        self._n: Counter[str] = Counter()
        self.transport = SipTransport(host, port, on_message=self._on_message, on_bad=self._bad, counts=self._n,
                                      log=self._log, warn=self._warn, idle_timeout=tcp_idle_timeout,
                                      limits=tcp_limits)
        self.table = TransactionTable(max_entries, self._n, self._log)
        self.proxy = Proxy(self.transport, self.table, self.pool, counts=self._n, log=self._log, warn=self._warn,
                           t1=t1, worker_timeout=worker_timeout, dialog_ttl=dialog_ttl,
                           retry_after_full=retry_after_full)
        self._sweeper: asyncio.Task | None = None
        self._admitting: set[asyncio.Task] = set()  # INVITEs whose admission check is being awaited

    @property
    def port(self) -> int:
        """The SIP port (UDP and TCP); the one bound once started when created with port 0."""
        return self.transport.port

    def sweep(self, now: float | None = None) -> None:
        """Forget expired transactions and dialogs (run every second by `start`)."""
        self.table.sweep(now)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind UDP and TCP on host:port (port 0: a free port, the same for both; see `.port`)."""
        await self.transport.start()
        self.proxy.own_hosts = {h.lower().strip("[]") for h in (self.host, self.transport.local_host,
                                                                   self.public_address or "") if h}
        self._sweeper = asyncio.create_task(self.table.sweep_loop())
        self._log.info("sip_dispatcher_listening", host=self.host, port=self.port,
                       workers=[f"{w.host}:{w.port}" for w in self.workers])

    async def stop(self) -> None:
        """Close the listeners and connections and forget every transaction (bounded time)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._sweeper, 2.0)
            self._sweeper = None
        for t in list(self._admitting):
            t.cancel()
        await asyncio.gather(*self._admitting, return_exceptions=True)
        self.table.cancel_timers()
        await self.transport.stop()
        self.table.clear()
        for w in self.workers:
            w.pending = 0

    # ------------------------------------------------------------------ the service's controls
    def set_load(self, worker_id: int, used: int) -> None:
        """A worker's `load` report: its slots in use. An INVITE the worker has answered (pjsua
        sends 100 Trying as it takes a call, or refuses it) is in the report from now on; one it
        has not answered yet may not be (the report can be older than its arrival, and counting
        it free sent floods into 486s from full workers), so it stays pending until it is."""
        w = self.pool.get(worker_id)
        if w is None:
            self._log.warning("sip_unknown_worker", worker=worker_id, what="load")
            return
        w.used = max(0, int(used))
        w.pending = self.table.unanswered_slots(w)

    def set_alive(self, worker_id: int, alive: bool) -> None:
        """A worker came up or went away. INVITEs it never answered fail over to another worker
        at once; ones it was ringing are answered 500 (the call died with it)."""
        w = self.pool.get(worker_id)
        if w is None:
            self._log.warning("sip_unknown_worker", worker=worker_id, what="alive")
            return
        was, w.alive = w.alive, bool(alive)
        if alive or not was:
            return
        w.used = 0
        self.proxy.worker_gone(w)
        w.pending = 0

    def release_invite(self, call_id: str | None) -> None:
        """The service registered the call of this Call-ID (its legs count as live from now) or
        could not: the INVITE's admission hold is no longer needed."""
        self.table.settle_call(call_id)

    def stats(self) -> dict[str, Any]:
        return {
            "invites": self._n["invites"],
            "invite_retransmissions": self._n["invite_retransmissions"],
            "forwarded": self._n["forwarded"],
            "failovers": self._n["failovers"],
            "worker_timeouts": self._n["worker_timeouts"],
            "forwarded_in_dialog": self._n["forwarded_in_dialog"],
            "relayed_responses": self._n["relayed"],
            "options": self._n["options"],
            "rejected": dict(sorted(self.proxy.rejected.items())),
            "parse_errors": self._n["parse_errors"],
            "stray_responses": self._n["stray_responses"],
            "keepalives": self._n["keepalives"],
            "tcp_connections": self.transport.connections,
            "tcp_refused": self._n["tcp_refused"],
            "tcp_slow_messages": self._n["tcp_slow_messages"],
            "internal_errors": self._n["internal_errors"],
            "draining": self.draining,
            "transactions": len(self.table.clients),
            "invites_open": len(self.table.invites),
            "dialogs": len(self.table.dialogs),
            "workers": self.pool.stats(),
        }

    # ------------------------------------------------------------------ input
    def _bad(self, e: SipParseError, origin: Origin, head: bytes) -> None:
        """A message that does not parse: count, log, and answer 400 if it is a request we can
        route a response for (it has a usable Via)."""
        self._n["parse_errors"] += 1
        self._warn("sip_parse_error", source=f"{origin.addr[0]}:{origin.addr[1]}", transport=origin.transport,
                   error=str(e), start=head.decode("latin-1")[:80] if head else None)
        p = e.partial
        if p is None or not p.is_request or p.method == "ACK":
            return
        try:
            via = self._fix_via(p, origin)
        except SipParseError:
            return
        self.proxy.reply(p, origin, via, e.status if isinstance(e, SipTooLarge) else 400, None, [_warning(399, str(e))])

    def _on_message(self, msg: SipMessage, origin: Origin) -> None:
        if msg.is_response:
            self.proxy.on_response(msg)
            return
        try:
            via = self._fix_via(msg, origin)
        except SipParseError as e:
            self._n["parse_errors"] += 1  # no usable Via: nowhere to send an answer
            self._warn("sip_unanswerable_request", source=f"{origin.addr[0]}:{origin.addr[1]}",
                       method=msg.method, error=str(e))
            return
        if msg.version != "SIP/2.0":
            if msg.method != "ACK":
                self.proxy.reply(msg, origin, via, 505)
            return
        try:
            self._check_request(msg)
        except SipParseError as e:
            self._n["parse_errors"] += 1
            self._warn("sip_bad_request", source=f"{origin.addr[0]}:{origin.addr[1]}", method=msg.method,
                       error=str(e))
            if msg.method != "ACK":
                self.proxy.reply(msg, origin, via, 400, None, [_warning(399, str(e))])
            return
        method = msg.method
        if method == "INVITE" and msg.to_tag is None:
            self._on_invite(msg, origin, via)
        elif method == "CANCEL":
            self.proxy.on_cancel(msg, origin, via)
        elif method == "ACK":
            self.proxy.on_ack(msg, origin, via)
        elif method == "OPTIONS" and msg.to_tag is None:
            self._n["options"] += 1
            self._on_options(msg, origin, via)
        elif method == "BYE" or msg.to_tag is not None:
            self.proxy.on_in_dialog(msg, origin, via)
        elif method in _KNOWN_NOT_ALLOWED:
            self.proxy.reply(msg, origin, via, 405, None, [("Allow", ALLOW)])
        else:
            self.proxy.reply(msg, origin, via, 501, None, [("Allow", ALLOW)])

    def _on_options(self, msg: SipMessage, origin: Origin, via: Via) -> None:
        """A front door (Kamailio's dispatcher module) probes each node with OPTIONS and takes out
        one that does not answer 2xx: so a node that would refuse every INVITE (draining, or no
        worker running) says so here, 503 with the same Retry-After and Warning as its INVITE
        refusal, and new calls go to the other nodes instead of each failing over from here.
        A node merely full still answers 200: that is per call, and failover handles it."""
        headers = [("Allow", ALLOW), ("Accept", "application/sdp")]
        if self.draining:
            self.proxy.reply(msg, origin, via, 503, None, [*headers, ("Retry-After", str(self.retry_after_draining)),
                                                           _warning(399, "The service is shutting down")])
        elif not any(w.alive for w in self.workers):
            self.proxy.reply(msg, origin, via, 503, None, [*headers, ("Retry-After", str(self.retry_after_full)),
                                                           _warning(399, self.pool.full_reason(1))])
        else:
            self.proxy.reply(msg, origin, via, 200, None, headers)

    @staticmethod
    def _check_request(msg: SipMessage) -> None:
        """The headers every request must have (RFC 3261 8.1.1), well-formed enough to use."""
        for name in ("From", "To", "Call-ID", "CSeq"):
            v = msg.get(name)
            if v is None or not v.strip():
                raise SipParseError(f"missing {name} header")
        cseq = msg.cseq
        assert cseq is not None
        if cseq[1] != msg.method:
            raise SipParseError(f"CSeq method {cseq[1]} does not match the request method {msg.method}")
        msg.max_forwards  # noqa: B018 - validates
        for name in ("From", "To"):
            uri = name_addr_uri(msg.get(name) or "")
            if ":" not in uri:
                raise SipParseError(f"{name} header has no URI")
        msg.from_tag  # noqa: B018 - validates parameters
        msg.to_tag  # noqa: B018

    @staticmethod
    def _fix_via(msg: SipMessage, origin: Origin) -> Via:
        """RFC 3261 18.2.1 and RFC 3581: note the real source in the top Via (`received` when it
        differs from the Via host, `received` and `rport` when rport was asked for), so responses
        reach a caller behind NAT."""
        via = msg.top_via
        if via is None:
            raise SipParseError("no Via header")
        ip, port = origin.addr
        changed = False
        if via.rport_requested:
            via.set("rport", str(port))
            via.set("received", ip)
            changed = True
        elif via.bare_host != ip:
            via.set("received", ip)
            changed = True
        if changed:
            msg.replace_top_via(via)
        return via

    # ------------------------------------------------------------------ initial INVITE
    def _on_invite(self, msg: SipMessage, origin: Origin, via: Via) -> None:
        key = invite_key(msg, via)
        inv = self.table.invites.get(key)
        if inv is not None:  # a retransmission: repeat what we last said, start nothing new
            self._n["invite_retransmissions"] += 1
            if inv.last_response is not None:
                self.transport.send_response(origin, inv.last_response, via)
            return
        self._n["invites"] += 1
        screened = self._screen(msg)
        if not isinstance(screened, int):
            status, reason, headers, why = screened
            self._log.info("sip_invite_rejected", call_id=msg.call_id, status=status, why=why,
                           source=f"{origin.addr[0]}:{origin.addr[1]}")
            inv = InviteTransaction(key, msg, origin, 0, time.monotonic() + LINGER_S)
            self.table.put(self.table.invites, key, inv)
            self.proxy.final_local(inv, status, reason, headers)
            return
        inv = InviteTransaction(key, msg, origin, screened, time.monotonic() + PENDING_TTL_S)
        self.table.put(self.table.invites, key, inv)
        trying = make_response(msg, 100).to_bytes()
        inv.last_response, inv.last_via = trying, via
        self.transport.send_response(origin, trying, via)
        task = asyncio.create_task(self._admit(inv))
        self._admitting.add(task)
        task.add_done_callback(self._admitting.discard)

    async def _admit(self, inv: InviteTransaction) -> None:
        """The service's admission check, then a worker; or the refusal, as the INVITE's final answer
        (487 if the caller cancelled meanwhile, whatever the check said)."""
        msg, needed = inv.request, inv.needed
        try:
            hold = await self.admission(needed, msg) if self.admission is not None else None
        except InviteRefused as e:
            retry = [("Retry-After", str(e.retry_after_s))] if e.retry_after_s is not None else []
            self._refuse(inv, e.status, e.reason, [*retry, _warning(399, e.why)], e.why)
            return
        except Exception as e:  # noqa: BLE001 - the caller still gets an answer
            self._n["internal_errors"] += 1
            self._log.error("sip_admission_failed", call_id=msg.call_id, error=repr(e))
            self._refuse(inv, 500, None, [_warning(399, "The service could not admit the call")], repr(e))
            return
        try:
            if self.table.invites.get(inv.key) is not inv or inv.final is not None:  # forgotten meanwhile
                if hold is not None:
                    hold.release()
                return
            worker = None if inv.cancelled else self.pool.pick(needed)
            if worker is None:
                if hold is not None:
                    hold.release()
                if inv.cancelled:  # CANCEL came while the check ran (it was answered 200 then)
                    self._refuse(inv, 487, None, [], "cancelled during admission")
                else:
                    why = self.pool.full_reason(needed)
                    self._refuse(inv, 503, None, [("Retry-After", str(self.retry_after_full)), _warning(399, why)],
                                 why)
                return
            inv.hold = hold
            self.proxy.forward_invite(inv, worker)
        except Exception as e:  # noqa: BLE001 - as the transport's guard does for the rest of the INVITE path
            self._n["internal_errors"] += 1
            self._log.error("sip_internal_error", call_id=msg.call_id, error=repr(e))
            if hold is not None and inv.hold is not hold:
                hold.release()
            self._refuse(inv, 500, None, [], repr(e))

    def _refuse(self, inv: InviteTransaction, status: int, reason: str | None, headers: list[tuple[str, str]],
                why: str) -> None:
        if self.table.invites.get(inv.key) is not inv or inv.final is not None:
            return
        if inv.cancelled and status != 487:  # the caller gave up meanwhile: that is the answer it waits for
            status, reason, headers, why = 487, None, [], f"cancelled during admission ({why})"
        self._log.info("sip_invite_rejected", call_id=inv.request.call_id, status=status, why=why,
                       source=f"{inv.origin.addr[0]}:{inv.origin.addr[1]}")
        self.proxy.final_local(inv, status, reason, headers)

    def _screen(self, msg: SipMessage) -> tuple[int, str | None, list[tuple[str, str]], str] | int:
        """Either (status, reason, extra headers, why) to refuse the INVITE with, or the slots it
        needs (then the admission check and a worker decide)."""
        if msg.max_forwards == 0:
            return 483, None, [], "Max-Forwards reached 0"
        scheme = (msg.uri or "").split(":", 1)[0].lower()
        if scheme not in ("sip", "sips", "tel"):
            return 416, None, [], f"request-URI scheme {scheme!r}"
        if self.draining:
            return (503, None, [("Retry-After", str(self.retry_after_draining)),
                                _warning(399, "The service is shutting down")], "draining")
        accepted = ", ".join(self.codecs)
        if not msg.body.strip():
            return (488, None, [_warning(399, "An SDP offer is required in the INVITE (late offer is not "
                                              f"supported); audio codecs accepted: {accepted}")],
                    "no SDP offer")
        ctype = msg.content_type
        if ctype and ctype != "application/sdp" and not ctype.startswith("multipart/"):
            return (415, None, [("Accept", "application/sdp"),
                                _warning(399, f"Content-Type {ctype} is not application/sdp")],
                    f"content type {ctype}")
        offered = sdp_audio_codecs(msg.body)
        audio = [c for c in offered if c.name.lower() not in _NOT_AUDIO]
        if not audio:
            return (488, None, [_warning(304, f"The offer has no audio stream; audio codecs accepted: {accepted}")],
                    "no audio in offer")
        if not common_codecs(audio, self.codecs):
            names = ", ".join(str(c) for c in audio)
            return (488, None, [_warning(305, f"None of the offered audio codecs ({names}) is supported; "
                                              f"accepted: {accepted}")],
                    f"no common codec in {names}")
        try:
            needed = call_slots(self.router.bridge_target(msg))
        except RouteError as e:
            return 400, "Bad Bridge Target", [_warning(399, str(e))], f"route error: {e}"
        if self.pool.pick(needed) is None:  # no worker could take it: no need to ask the service
            why = self.pool.full_reason(needed)
            return 503, None, [("Retry-After", str(self.retry_after_full)), _warning(399, why)], why
        return needed
