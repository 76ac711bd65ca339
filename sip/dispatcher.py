"""The SIP dispatcher: the public SIP port (UDP and TCP) in front of the pjsua2 worker processes.

A pjsua2 process holds at most 4 calls, so `callbridge serve` runs several and this proxy spreads
new calls over them, the way Kamailio's dispatcher module does in production (call-load
algorithm with a max load per worker, 503 when everything is full, failover on 408/486/500/503
only when another worker can take the call, OPTIONS answered locally).

It is a forwarding proxy with a small transaction table and no Record-Route: only initial
INVITEs and their CANCEL/ACK really need it; in-dialog requests go from the caller straight to
the worker's Contact, and the few that arrive here anyway are routed by Call-ID. What it keeps:

Failover (to the least-loaded other worker with room, never one already tried) happens on
408/486/500/503 or no answer at all, but only before the worker sent an 18x: the worker rings
(180) as soon as it takes a call, so a failure after that is the call's own outcome (in bridge
mode, the target's status) and is passed on instead of dialling the target again elsewhere.

- `_invites`, the caller-facing state of each initial INVITE, keyed by (Call-ID, caller's branch):
  absorbs retransmissions (answering with the last response sent), finds the worker for CANCEL
  and for the ACK of a non-2xx final response, and remembers which workers were tried.
- `_clients`, every request sent to a worker, keyed by (our branch, method): routes responses back
  to the caller over the transport the request came in on (a TCP caller keeps its connection).
- `_dialogs`, Call-ID -> worker, for in-dialog requests that reach the dispatcher.

The service's admission check (disk reserve, the owner's session limit and credits, decode
capacity) runs once per INVITE transaction and returns a hold on what it admitted; the INVITE
keeps it until the service reports its call registered (`release_invite`, on the worker's
call_started) or the INVITE ends otherwise (a non-2xx final response, the entry expiring or
evicted, shutdown), so INVITEs arriving together cannot all pass the check before any of their
calls counts as live.

Entries expire (64*T1 = 32 s after a final response; established calls after `dialog_ttl`) and
every table is capped, so memory stays bounded under any traffic. Pending INVITEs count against
their worker's load until a `load` report that follows the worker's first answer to them
(`set_load`) or a final response, so a burst of calls cannot overfill a worker between reports.

Nothing a peer sends may take the service down: a bad packet is counted, logged (rate-limited)
and, where it parses far enough to be answered, answered with 400; the next packet is handled
normally. Not handled: TLS/WS transports, DNS names as response targets (Via `received` is always
an IP here), forking, authentication, Record-Route, and late-offer (body-less) INVITEs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bridge.logs import get_logger
from sip.message import (
    MAGIC_COOKIE,
    SipMessage,
    SipParseError,
    SipTooLarge,
    StreamParser,
    Via,
    common_codecs,
    make_response,
    name_addr_uri,
    new_branch,
    parse_message,
    sdp_audio_codecs,
)
from sip.routing import RouteError, Router

__all__ = ["ALLOW", "FAILOVER_CODES", "Dispatcher", "Hold", "InviteRefused", "TcpLimits", "Worker"]

T1 = 0.5  # RFC 3261 round-trip estimate
T2 = 4.0
LINGER_S = 64 * T1  # how long a finished transaction is remembered (absorbs retransmissions)
PENDING_TTL_S = 300.0  # an INVITE without a final response is forgotten after this (Timer C-like)
FAILOVER_CODES = frozenset({408, 486, 500, 503})
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, PRACK"
_KNOWN_NOT_ALLOWED = frozenset({"REGISTER", "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE", "REFER",
                                "INFO", "UPDATE", "PRACK"})
_NOT_AUDIO = frozenset({"telephone-event", "cn"})
_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


_TCP_READ = 16 << 10  # bytes per read, and the StreamReader's buffer limit


class Hold(Protocol):
    """What the service's admission keeps for an admitted INVITE (bridge.admission.Reservation)."""

    def release(self) -> None: ...


class InviteRefused(Exception):
    """Raised by the admission check: answer the INVITE `status` (503 Service Unavailable unless
    given) with a Warning saying `why`, and Retry-After when `retry_after_s` is set."""

    def __init__(self, why: str, retry_after_s: int | None, *, status: int = 503, reason: str | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.retry_after_s = retry_after_s
        self.status = status
        self.reason = reason  # the reason phrase, when the status has none in sip.message.REASONS


@dataclass(frozen=True)
class TcpLimits:
    """What one TCP peer may cost (config [sip] tcp_*): without them each connection could buffer
    a 1 MiB message and trickle it for the whole idle timeout, and connections were unbounded."""

    max_connections: int = 512  # open at once, all sources together; more are closed at once
    max_connections_per_source: int = 32  # from one IP address
    max_message_bytes: int = 32 << 10  # header section, and body (Content-Length), each
    message_timeout_s: float = 10.0  # a message must be complete this long after its first byte


@dataclass
class Worker:
    """One pjsua2 worker: where it listens, how many call slots it has and uses (from its `load`
    reports), and `pending`, the slots of INVITEs sent to it that no report reflects yet."""

    id: int
    host: str
    port: int
    capacity: int
    used: int = 0
    alive: bool = False
    pending: int = 0

    @property
    def load(self) -> int:
        return self.used + self.pending

    @property
    def free(self) -> int:
        return self.capacity - self.load

    @property
    def addr(self) -> tuple[str, int]:
        return self.host, self.port


@dataclass(eq=False)
class _Conn:
    """A caller's TCP connection; responses to requests that came in on it go back on it."""

    writer: asyncio.StreamWriter
    peer: tuple[str, int]
    closed: bool = False

    def send(self, data: bytes) -> bool:
        if self.closed:
            return False
        transport = self.writer.transport
        if transport.is_closing():
            self.closed = True
            return False
        if transport.get_write_buffer_size() > (1 << 20):  # peer not reading: do not buffer forever
            self.close()
            return False
        self.writer.write(data)
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.writer.close()


@dataclass(eq=False)
class _Origin:
    """Where a request came from: responses go back the same way."""

    transport: str  # "UDP" or "TCP"
    addr: tuple[str, int]
    conn: _Conn | None = None


@dataclass(eq=False)
class _Client:
    """A request we sent to a worker (a client transaction), keyed by (branch, method)."""

    branch: str
    method: str
    data: bytes
    request: SipMessage
    worker: Worker
    origin: _Origin | None
    invite: _Invite | None
    expires: float
    deadline: float = 0.0
    responded: bool = False
    provisional: bool = False  # sent an 18x: the worker took the call (a later failure is the call's own)
    final: int | None = None
    abandoned: bool = False  # failed over / timed out: late responses are ACKed (or hung up), not relayed
    local: bool = False  # generated here (our CANCEL, ACK-then-BYE): responses are absorbed
    timer: asyncio.TimerHandle | None = None
    index_key: tuple[str, str, str] | None = None


@dataclass(eq=False)
class _Invite:
    """The caller-facing side of an initial INVITE, keyed by (Call-ID, caller's branch)."""

    key: tuple[str, str]
    request: SipMessage  # as received, top Via with received/rport
    origin: _Origin
    needed: int
    expires: float
    tried: list[int] = field(default_factory=list)
    current: _Client | None = None
    counted: bool = False  # `needed` is in current.worker.pending
    last_response: bytes | None = None
    last_via: Via | None = None
    final: int | None = None
    local: bool = False  # the final response was generated here: its ACK stops here
    cancelled: bool = False
    hold: Hold | None = None  # the admitted legs, until the call is registered or the INVITE fails


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: Dispatcher) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable etc.: the next send may work
        self.owner._log.debug("sip_udp_error", error=str(exc))


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _warning(code: int, text: str) -> tuple[str, str]:
    return "Warning", f"{code} callbridge {_quote(text)}"


def _uri_hostport(uri: str) -> tuple[str, int | None]:
    """Host and port of a sip: URI ("sip:u@h:5060;lr" -> ("h", 5060))."""
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    rest = rest.split("@", 1)[-1]
    for sep in (";", "?", ">"):
        rest = rest.split(sep, 1)[0]
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port = rest.partition(":")
    return host.lower(), int(port) if port.isdigit() else None


class Dispatcher:
    """Owns host:port (UDP and TCP) and spreads new calls over `workers` (see the module doc).

    `codecs` are the accepted codecs ("PCMU/8000", ...): an offer with none of them gets 488.
    `public_address` names this host as callers see it (only used to recognise a Route to us).
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
                 admission: Callable[[int, SipMessage], Hold | None] | None = None) -> None:
        if not codecs:
            raise ValueError("Dispatcher needs at least one accepted codec")
        ids = [w.id for w in workers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker ids must be unique, got {ids}")
        self.host = host
        self._want_port = port
        self.port = port
        self.workers = list(workers)
        self._by_id = {w.id: w for w in self.workers}
        self.router = router
        self.codecs = tuple(codecs)
        self.public_address = public_address
        base = logger if logger is not None else get_logger("callbridge.sip.dispatcher")
        self._log = base.bind(component="sip_dispatcher") if hasattr(base, "bind") else base
        self.t1 = t1
        self.worker_timeout = worker_timeout
        self.dialog_ttl = dialog_ttl
        self.retry_after_full = retry_after_full
        self.retry_after_draining = retry_after_draining
        self.max_entries = max_entries
        self.tcp_idle_timeout = tcp_idle_timeout
        self.tcp_limits = tcp_limits or TcpLimits()
        self.draining = False
        # the service's admission check (disk reserve, session limit, decode capacity, credits):
        # (slots needed, the INVITE) -> a hold on what it admitted (or None), or InviteRefused
        self.admission = admission

        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._conns: set[_Conn] = set()
        self._conns_by_ip: Counter[str] = Counter()
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self._via_host = ""
        self._own_hosts: set[str] = set()

        self._invites: dict[tuple[str, str], _Invite] = {}
        self._clients: dict[tuple[str, str], _Client] = {}
        self._retrans: dict[tuple[str, str, str], tuple[str, str]] = {}  # caller's (cid, branch, method) -> client key
        self._dialogs: dict[str, tuple[int, float]] = {}  # Call-ID -> (worker id, expires)

        self._n: Counter[str] = Counter()
        self._rejected: Counter[int] = Counter()
        self._warn_window = (0, 0, 0)  # (second, logged this second, suppressed)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind UDP and TCP on host:port (port 0: a free port, the same for both; see `.port`)."""
        loop = asyncio.get_running_loop()
        attempts = 20 if self._want_port == 0 else 1
        for attempt in range(attempts):
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(self.host, self._want_port))
            except OSError as e:
                raise OSError(e.errno, f"SIP dispatcher cannot bind UDP {self.host}:{self._want_port}: "
                                       f"{e.strerror or e}") from None
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._on_tcp, self.host, port, limit=_TCP_READ)
            except OSError as e:
                udp.close()
                if attempt + 1 < attempts:
                    continue  # the free UDP port was taken for TCP: pick another
                raise OSError(e.errno, f"SIP dispatcher cannot bind TCP {self.host}:{port}: "
                                       f"{e.strerror or e}") from None
            self._udp = udp  # type: ignore[assignment]
            self.port = port
            break
        sock = self._udp.get_extra_info("socket") if self._udp else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        host = _WILDCARD.get(self.host, self.host)
        self._via_host = f"[{host}]" if ":" in host else host
        self._own_hosts = {h.lower().strip("[]") for h in (self.host, host, self.public_address or "") if h}
        self._sweeper = asyncio.create_task(self._sweep_loop())
        self._log.info("sip_dispatcher_listening", host=self.host, port=self.port,
                       workers=[f"{w.host}:{w.port}" for w in self.workers])

    async def stop(self) -> None:
        """Close the listeners and connections and forget every transaction (bounded time)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._sweeper, 2.0)
            self._sweeper = None
        for c in self._clients.values():
            if c.timer is not None:
                c.timer.cancel()
        for t in list(self._tasks):
            t.cancel()
        for conn in list(self._conns):
            conn.close()
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 2.0)
            self._tcp = None
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        self._clients.clear()
        for inv in self._invites.values():
            self._settle(inv)
        self._invites.clear()
        self._retrans.clear()
        self._dialogs.clear()
        for w in self.workers:
            w.pending = 0

    # ------------------------------------------------------------------ the service's controls
    def set_load(self, worker_id: int, used: int) -> None:
        """A worker's `load` report: its slots in use. An INVITE the worker has answered (pjsua
        sends 100 Trying as it takes a call, or refuses it) is in the report from now on; one it
        has not answered yet may not be (the report can be older than its arrival, and counting
        it free sent floods into 486s from full workers), so it stays pending until it is."""
        w = self._by_id.get(worker_id)
        if w is None:
            self._log.warning("sip_unknown_worker", worker=worker_id, what="load")
            return
        w.used = max(0, int(used))
        pending = 0
        for inv in self._invites.values():
            if inv.counted and inv.current is not None and inv.current.worker is w:
                if inv.current.responded:
                    inv.counted = False
                else:
                    pending += inv.needed
        w.pending = pending

    def set_alive(self, worker_id: int, alive: bool) -> None:
        """A worker came up or went away. INVITEs it never answered fail over to another worker
        at once; ones it was ringing are answered 500 (the call died with it)."""
        w = self._by_id.get(worker_id)
        if w is None:
            self._log.warning("sip_unknown_worker", worker=worker_id, what="alive")
            return
        was, w.alive = w.alive, bool(alive)
        if alive or not was:
            return
        w.used = 0
        for inv in list(self._invites.values()):
            c = inv.current
            if c is None or c.worker is not w or c.abandoned or inv.final is not None:
                continue
            self._abandon(c)
            self._release(inv)
            if not c.provisional:
                self._next_or_fail(inv, 503, "worker exited")
            else:
                self._final_local(inv, 500, "Worker Exited")
        w.pending = 0

    def release_invite(self, call_id: str | None) -> None:
        """The service registered the call of this Call-ID (its legs count as live from now) or
        could not: the INVITE's admission hold is no longer needed."""
        for inv in self._invites.values():
            if inv.hold is not None and inv.request.call_id == call_id:
                self._settle(inv)

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
            "rejected": dict(sorted(self._rejected.items())),
            "parse_errors": self._n["parse_errors"],
            "stray_responses": self._n["stray_responses"],
            "keepalives": self._n["keepalives"],
            "tcp_connections": len(self._conns),
            "tcp_refused": self._n["tcp_refused"],
            "tcp_slow_messages": self._n["tcp_slow_messages"],
            "internal_errors": self._n["internal_errors"],
            "draining": self.draining,
            "transactions": len(self._clients),
            "invites_open": len(self._invites),
            "dialogs": len(self._dialogs),
            "workers": [{"id": w.id, "alive": w.alive, "used": w.used, "pending": w.pending,
                         "capacity": w.capacity} for w in self.workers],
        }

    # ------------------------------------------------------------------ input
    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            if not data.strip(b"\r\n\t \x00"):
                self._n["keepalives"] += 1  # RFC 5626 CRLF keep-alive (or an empty datagram)
                return
            origin = _Origin("UDP", addr)
            try:
                msg = parse_message(data)
            except SipParseError as e:
                self._bad(e, origin, data[:80])
                return
            self._on_message(msg, origin)
        except Exception:  # noqa: BLE001 - no packet may take the listener down
            self._n["internal_errors"] += 1
            self._log.exception("sip_internal_error", source=f"{addr[0]}:{addr[1]}", transport="UDP")

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        lim = self.tcp_limits
        why = ("connections" if len(self._conns) >= lim.max_connections
               else "connections_per_source" if self._conns_by_ip[peer[0]] >= lim.max_connections_per_source
               else None)
        if why is not None:  # closed at once: a connection costs memory until its first timeout
            self._n["tcp_refused"] += 1
            self._warn("sip_tcp_refused", source=f"{peer[0]}:{peer[1]}", limit=why,
                       open=len(self._conns), from_source=self._conns_by_ip[peer[0]])
            writer.transport.abort()
            return
        await self._serve_conn(reader, _Conn(writer, (peer[0], peer[1])))

    async def _serve_conn(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        """Read SIP messages off one TCP connection until it closes, idles out, mis-frames, sends
        a message over the size limit or takes longer than `message_timeout_s` to send one."""
        self._conns.add(conn)
        self._conns_by_ip[conn.peer[0]] += 1
        origin = _Origin("TCP", conn.peer, conn)
        lim = self.tcp_limits
        parser = StreamParser(max_header=lim.max_message_bytes, max_body=lim.max_message_bytes)
        pongs = 0
        started: float | None = None  # when the first byte of the message being read arrived
        try:
            while not conn.closed:
                timeout = self.tcp_idle_timeout
                if parser.in_message:
                    now = time.monotonic()
                    started = now if started is None else started
                    timeout = started + lim.message_timeout_s - now
                    if timeout <= 0:
                        self._n["tcp_slow_messages"] += 1
                        self._warn("sip_tcp_message_timeout", source=f"{conn.peer[0]}:{conn.peer[1]}",
                                   after_s=lim.message_timeout_s, buffered=parser.buffered)
                        break
                else:
                    started = None
                try:
                    data = await asyncio.wait_for(reader.read(_TCP_READ), timeout)
                except TimeoutError:
                    if parser.in_message:
                        continue  # the message timeout: logged and closed above
                    break  # idle
                if not data:
                    break
                parser.feed(data)
                while True:
                    try:
                        msg = parser.pop()
                    except SipParseError as e:
                        self._bad(e, origin, b"")
                        return  # the stream position is lost: close
                    if parser.pings > pongs:  # RFC 5626: a CRLF pong per CRLFCRLF ping
                        conn.send(b"\r\n" * (parser.pings - pongs))
                        pongs = parser.pings
                    if msg is None:
                        break
                    try:
                        self._on_message(msg, origin)
                    except Exception:  # noqa: BLE001 - no message may take the connection down
                        self._n["internal_errors"] += 1
                        self._log.exception("sip_internal_error", source=f"{conn.peer[0]}:{conn.peer[1]}",
                                            transport="TCP")
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()
            self._conns.discard(conn)
            self._conns_by_ip[conn.peer[0]] -= 1
            if self._conns_by_ip[conn.peer[0]] <= 0:
                del self._conns_by_ip[conn.peer[0]]

    def _bad(self, e: SipParseError, origin: _Origin, head: bytes) -> None:
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
        self._reply(p, origin, via, e.status if isinstance(e, SipTooLarge) else 400, None, [_warning(399, str(e))])

    def _on_message(self, msg: SipMessage, origin: _Origin) -> None:
        if msg.is_response:
            self._on_response(msg)
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
                self._reply(msg, origin, via, 505)
            return
        try:
            self._check_request(msg)
        except SipParseError as e:
            self._n["parse_errors"] += 1
            self._warn("sip_bad_request", source=f"{origin.addr[0]}:{origin.addr[1]}", method=msg.method,
                       error=str(e))
            if msg.method != "ACK":
                self._reply(msg, origin, via, 400, None, [_warning(399, str(e))])
            return
        method = msg.method
        if method == "INVITE" and msg.to_tag is None:
            self._on_invite(msg, origin, via)
        elif method == "CANCEL":
            self._on_cancel(msg, origin, via)
        elif method == "ACK":
            self._on_ack(msg, origin, via)
        elif method == "OPTIONS" and msg.to_tag is None:
            self._n["options"] += 1
            self._reply(msg, origin, via, 200, None, [("Allow", ALLOW), ("Accept", "application/sdp")])
        elif method == "BYE" or msg.to_tag is not None:
            self._on_in_dialog(msg, origin, via)
        elif method in _KNOWN_NOT_ALLOWED:
            self._reply(msg, origin, via, 405, None, [("Allow", ALLOW)])
        else:
            self._reply(msg, origin, via, 501, None, [("Allow", ALLOW)])

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
    def _fix_via(msg: SipMessage, origin: _Origin) -> Via:
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
    def _invite_key(self, msg: SipMessage, via: Via) -> tuple[str, str]:
        b = via.branch
        if b and b.startswith(MAGIC_COOKIE):
            return msg.call_id or "", b
        cseq = msg.cseq  # RFC 2543 peer without a unique branch: match on From-tag and CSeq number
        return msg.call_id or "", f"2543:{msg.from_tag}:{cseq[0] if cseq else 0}"

    def _on_invite(self, msg: SipMessage, origin: _Origin, via: Via) -> None:
        key = self._invite_key(msg, via)
        inv = self._invites.get(key)
        if inv is not None:  # a retransmission: repeat what we last said, start nothing new
            self._n["invite_retransmissions"] += 1
            if inv.last_response is not None:
                self._send_response(origin, inv.last_response, via)
            return
        self._n["invites"] += 1
        screened = self._screen(msg)
        if len(screened) == 4:
            status, reason, headers, why = screened  # type: ignore[misc]
            self._log.info("sip_invite_rejected", call_id=msg.call_id, status=status, why=why,
                           source=f"{origin.addr[0]}:{origin.addr[1]}")
            inv = _Invite(key, msg, origin, 0, time.monotonic() + LINGER_S)
            self._put(self._invites, key, inv)
            self._final_local(inv, status, reason, headers)
            return
        needed, worker, hold = screened  # type: ignore[misc]
        inv = _Invite(key, msg, origin, needed, time.monotonic() + PENDING_TTL_S, hold=hold)
        self._put(self._invites, key, inv)
        trying = make_response(msg, 100).to_bytes()
        inv.last_response, inv.last_via = trying, via
        self._send_response(origin, trying, via)
        self._forward_invite(inv, worker)

    def _screen(self, msg: SipMessage) -> (tuple[int, str | None, list[tuple[str, str]], str]
                                           | tuple[int, Worker, Hold | None]):
        """Either (status, reason, extra headers, why) to refuse the INVITE with, or
        (slots needed, worker to send it to, admission's hold on its legs)."""
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
        headers: dict[str, str] = {}
        for n, v in msg.headers:
            headers.setdefault(n, v)
        try:
            needed = 2 if self.router.target_for(msg.request_user, headers) else 1
        except RouteError as e:
            return 400, "Bad Bridge Target", [_warning(399, str(e))], f"route error: {e}"
        try:
            hold = self.admission(needed, msg) if self.admission is not None else None
        except InviteRefused as e:
            retry = [("Retry-After", str(e.retry_after_s))] if e.retry_after_s is not None else []
            return e.status, e.reason, [*retry, _warning(399, e.why)], e.why
        worker = self._pick(needed, ())
        if worker is None:
            if hold is not None:
                hold.release()
            alive = [w for w in self.workers if w.alive]
            why = ("no SIP worker is running" if not alive
                   else f"all call slots are in use ({sum(w.load for w in alive)}/{sum(w.capacity for w in alive)}, "
                        f"this call needs {needed})")
            return 503, None, [("Retry-After", str(self.retry_after_full)), _warning(399, why)], why
        return needed, worker, hold

    def _pick(self, needed: int, exclude: Sequence[int]) -> Worker | None:
        """The least-loaded live worker with `needed` free slots (call-load balancing)."""
        ok = [w for w in self.workers if w.alive and w.id not in exclude and w.free >= needed]
        return min(ok, key=lambda w: (w.load / max(w.capacity, 1), w.load, w.id)) if ok else None

    def _our_via(self, branch: str) -> str:
        return f"SIP/2.0/UDP {self._via_host}:{self.port};branch={branch}"

    def _strip_own_route(self, msg: SipMessage) -> None:
        """Drop a top Route naming us (a caller using us as its outbound proxy, RFC 3261 16.4)."""
        try:
            routes = msg.get_list("Route")
            if not routes:
                return
            host, port = _uri_hostport(name_addr_uri(routes[0]))
        except SipParseError:
            return
        if host in self._own_hosts and (port or 5060) == self.port:
            msg.set_list("Route", routes[1:])

    def _forward_invite(self, inv: _Invite, worker: Worker) -> None:
        fwd = inv.request.copy()
        self._strip_own_route(fwd)
        mf = inv.request.max_forwards
        fwd.set("Max-Forwards", str((70 if mf is None else mf) - 1))
        branch = new_branch("cb")
        fwd.push_via(self._our_via(branch))
        data = fwd.to_bytes()
        now = time.monotonic()
        c = _Client(branch, "INVITE", data, fwd, worker, inv.origin, inv, now + PENDING_TTL_S,
                    deadline=now + self.worker_timeout)
        self._put(self._clients, (branch, "INVITE"), c)
        inv.current = c
        inv.tried.append(worker.id)
        worker.pending += inv.needed
        inv.counted = True
        self._put(self._dialogs, inv.request.call_id or "", (worker.id, now + PENDING_TTL_S))
        self._n["forwarded"] += 1
        self._log.info("sip_invite_forwarded", call_id=inv.request.call_id, worker=worker.id,
                       slots=inv.needed, load=f"{worker.load}/{worker.capacity}", attempt=len(inv.tried))
        self._udp_send(data, worker.addr)
        self._arm(c, self.t1)

    def _arm(self, c: _Client, interval: float) -> None:
        """Timer A/B towards the worker: resend the INVITE until it answers anything; with no
        answer by `worker_timeout`, treat the worker as a 408 and fail over."""
        loop = asyncio.get_running_loop()
        delay = max(0.0, min(interval, c.deadline - time.monotonic()))

        def fire() -> None:
            c.timer = None
            try:
                if c.responded or c.abandoned or c.final is not None:
                    return
                if time.monotonic() >= c.deadline - 1e-3:
                    self._on_worker_timeout(c)
                    return
                self._udp_send(c.data, c.worker.addr)
                self._arm(c, min(interval * 2, T2))
            except Exception:  # noqa: BLE001 - a timer bug must not stop the loop
                self._n["internal_errors"] += 1
                self._log.exception("sip_internal_error", where="retransmit timer")

        c.timer = loop.call_later(delay, fire)

    def _on_worker_timeout(self, c: _Client) -> None:
        inv = c.invite
        self._n["worker_timeouts"] += 1
        self._warn("sip_worker_no_answer", worker=c.worker.id, call_id=c.request.call_id,
                   after_s=self.worker_timeout)
        self._abandon(c)
        if inv is None or inv.current is not c or inv.final is not None:
            return
        self._release(inv)
        if inv.cancelled:
            self._final_local(inv, 487)
        else:
            self._next_or_fail(inv, 408, "no answer")

    def _next_or_fail(self, inv: _Invite, status: int, why: str) -> None:
        """Fail over to another worker that can take the call, else answer `status` here."""
        nxt = self._pick(inv.needed, inv.tried)
        if nxt is not None and not inv.cancelled:
            self._n["failovers"] += 1
            self._log.warning("sip_failover", call_id=inv.request.call_id, from_worker=inv.tried[-1],
                              to_worker=nxt.id, why=why)
            self._forward_invite(inv, nxt)
            return
        self._final_local(inv, 487 if inv.cancelled else status,
                          headers=[("Retry-After", str(self.retry_after_full))] if status == 503 else [])

    def _abandon(self, c: _Client) -> None:
        c.abandoned = True
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None
        c.expires = time.monotonic() + LINGER_S

    def _release(self, inv: _Invite) -> None:
        """Stop counting this INVITE's slots as pending on its worker."""
        if inv.counted and inv.current is not None:
            w = inv.current.worker
            w.pending = max(0, w.pending - inv.needed)
        inv.counted = False

    def _settle(self, inv: _Invite) -> None:
        """Give back the INVITE's admission hold (its call is registered, or there will be none)."""
        if inv.hold is not None:
            inv.hold.release()
            inv.hold = None

    def _final_local(self, inv: _Invite, status: int, reason: str | None = None,
                     headers: list[tuple[str, str]] | None = None) -> None:
        """Answer the caller's INVITE here with a final response (and remember it for
        retransmissions; its ACK stops here)."""
        self._settle(inv)
        via = inv.request.top_via
        assert via is not None
        data = self._reply(inv.request, inv.origin, via, status, reason, headers or [])
        inv.final, inv.local, inv.last_response, inv.last_via = status, True, data, via
        inv.expires = time.monotonic() + LINGER_S
        self._expire_dialog(inv.request.call_id, LINGER_S, only_worker=None)

    # ------------------------------------------------------------------ CANCEL / ACK
    def _on_cancel(self, msg: SipMessage, origin: _Origin, via: Via) -> None:
        inv = self._invites.get(self._invite_key(msg, via))
        if inv is None:
            self._reply(msg, origin, via, 481)
            return
        self._reply(msg, origin, via, 200)  # hop by hop: the CANCEL transaction ends here
        if inv.final is not None:
            return  # too late: the INVITE has its final response
        inv.cancelled = True
        c = inv.current
        if c is None or c.abandoned:
            return
        cancel = SipMessage(method="CANCEL", uri=c.request.uri)
        cancel.headers.append(("Via", self._our_via(c.branch)))
        cancel.headers.append(("Max-Forwards", "70"))
        for r in c.request.get_all("Route"):
            cancel.headers.append(("Route", r))
        for name in ("From", "To", "Call-ID"):
            cancel.headers.append((name, c.request.get(name) or ""))
        cseq = c.request.cseq
        cancel.headers.append(("CSeq", f"{cseq[0] if cseq else 1} CANCEL"))
        if msg.get("Reason"):
            cancel.headers.append(("Reason", msg.get("Reason") or ""))
        data = cancel.to_bytes()
        cc = _Client(c.branch, "CANCEL", data, cancel, c.worker, None, None,
                     time.monotonic() + LINGER_S, local=True)
        self._put(self._clients, (c.branch, "CANCEL"), cc)
        self._log.info("sip_cancel_forwarded", call_id=msg.call_id, worker=c.worker.id)
        self._udp_send(data, c.worker.addr)

    def _on_ack(self, msg: SipMessage, origin: _Origin, via: Via) -> None:
        inv = self._invites.get(self._invite_key(msg, via))
        if inv is not None and (inv.final is None or inv.final >= 300):
            c = inv.current
            if inv.local or c is None or inv.final is None:
                return  # ACK of our own final response (or a confused peer): it ends here
            self._forward_stateless(msg, c.worker, c.branch)  # same branch: matches the worker's INVITE transaction
            return
        key = (msg.call_id or "", via.branch or "", "INVITE")
        ck = self._retrans.get(key)  # ACK of a non-2xx answer to a re-INVITE forwarded by us
        c = self._clients.get(ck) if ck else None
        if c is not None and c.final is not None and c.final >= 300:
            self._forward_stateless(msg, c.worker, c.branch)
            return
        w = self._dialog_worker(msg.call_id)
        if w is not None:  # ACK of a 2xx, from a UA that sends it here instead of to the Contact
            self._forward_stateless(msg, w, new_branch("cb"))
            self._n["forwarded_in_dialog"] += 1
        # else: nothing to do; an ACK is never answered

    def _forward_stateless(self, msg: SipMessage, worker: Worker, branch: str) -> None:
        fwd = msg.copy()
        mf = msg.max_forwards
        if mf is not None and mf <= 0:
            return
        fwd.set("Max-Forwards", str((70 if mf is None else mf) - 1))
        self._strip_own_route(fwd)
        fwd.push_via(self._our_via(branch))
        self._udp_send(fwd.to_bytes(), worker.addr)

    # ------------------------------------------------------------------ in-dialog requests
    def _dialog_worker(self, call_id: str | None) -> Worker | None:
        entry = self._dialogs.get(call_id or "")
        if entry is None:
            return None
        w = self._by_id.get(entry[0])
        return w if w is not None and w.alive else None

    def _expire_dialog(self, call_id: str | None, after: float, only_worker: int | None) -> None:
        entry = self._dialogs.get(call_id or "")
        if entry is not None and (only_worker is None or entry[0] == only_worker):
            self._dialogs[call_id or ""] = (entry[0], time.monotonic() + after)

    def _on_in_dialog(self, msg: SipMessage, origin: _Origin, via: Via) -> None:
        """BYE, re-INVITE, INFO... that reached the dispatcher: send them to the worker that has
        the call (by Call-ID), statefully enough to route the response back."""
        method = msg.method or ""
        call_id = msg.call_id or ""
        rkey = (call_id, via.branch or f"2543:{msg.cseq}", method)
        ck = self._retrans.get(rkey)
        old = self._clients.get(ck) if ck else None
        if old is not None:  # retransmission: the worker's transaction answers it again
            self._udp_send(old.data, old.worker.addr)
            return
        w = self._dialog_worker(call_id)
        if w is None:
            self._reply(msg, origin, via, 481)
            return
        if msg.max_forwards == 0:
            self._reply(msg, origin, via, 483)
            return
        fwd = msg.copy()
        mf = msg.max_forwards
        fwd.set("Max-Forwards", str((70 if mf is None else mf) - 1))
        self._strip_own_route(fwd)
        branch = new_branch("cb")
        fwd.push_via(self._our_via(branch))
        data = fwd.to_bytes()
        ttl = PENDING_TTL_S if method == "INVITE" else LINGER_S
        c = _Client(branch, method, data, fwd, w, origin, None, time.monotonic() + ttl, index_key=rkey)
        self._put(self._clients, (branch, method), c)
        self._put(self._retrans, rkey, (branch, method))
        self._n["forwarded_in_dialog"] += 1
        self._log.info("sip_in_dialog_forwarded", method=method, call_id=call_id, worker=w.id)
        self._udp_send(data, w.addr)

    # ------------------------------------------------------------------ responses from workers
    def _on_response(self, msg: SipMessage) -> None:
        try:
            via = msg.top_via
            cseq = msg.cseq
        except SipParseError as e:
            self._n["parse_errors"] += 1
            self._warn("sip_bad_response", error=str(e))
            return
        c = self._clients.get((via.branch or "", cseq[1])) if via is not None and cseq is not None else None
        if c is None:
            self._n["stray_responses"] += 1
            self._log.debug("sip_stray_response", status=msg.status, call_id=msg.call_id)
            return
        status = msg.status or 0
        c.responded = True
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None
        if c.local:
            return  # answer to our own CANCEL / BYE
        if c.method == "INVITE" and c.invite is not None:
            self._on_invite_response(c, msg, status)
            return
        if status == 100:
            return  # hop by hop (RFC 3261 16.7): never relayed
        if status >= 200:
            first = c.final is None
            c.final = status
            c.expires = time.monotonic() + LINGER_S
            if first and c.method == "BYE" and status < 300:
                self._expire_dialog(msg.call_id, LINGER_S, only_worker=c.worker.id)
        self._relay(c, msg)

    def _on_invite_response(self, c: _Client, msg: SipMessage, status: int) -> None:
        inv = c.invite
        assert inv is not None
        now = time.monotonic()
        if c.abandoned or inv.current is not c:
            if status >= 300:
                self._ack_worker(c, msg)
            elif status >= 200:
                self._hang_up_stray(c, msg)
            return
        if status == 100:
            return  # we said Trying ourselves
        if status < 200:
            c.provisional = True
            data = self._relay(c, msg)
            if data is not None:
                inv.last_response = data
            return
        first = c.final is None
        if status < 300:
            c.final = status
            if inv.final is None:
                inv.final = status
            c.expires = inv.expires = now + LINGER_S
            if first:
                self._put(self._dialogs, inv.request.call_id or "", (c.worker.id, now + self.dialog_ttl))
                self._log.info("sip_call_answered", call_id=inv.request.call_id, worker=c.worker.id)
            self._relay(c, msg)  # every 2xx retransmission too: the caller's ACK goes to the Contact
            return
        if first:
            c.final = status
            c.expires = now + LINGER_S
            self._release(inv)
            # Only a worker that refused the call outright is skipped: after its 18x the worker had
            # taken the call, and a failure is the call's own (a bridge target busy or unreachable,
            # relayed with the target's status); failing over would dial the target again.
            if status in FAILOVER_CODES and not c.provisional and not inv.cancelled and inv.final is None:
                nxt = self._pick(inv.needed, inv.tried)
                if nxt is not None:
                    self._ack_worker(c, msg)
                    self._abandon(c)
                    self._n["failovers"] += 1
                    self._log.warning("sip_failover", call_id=inv.request.call_id, from_worker=c.worker.id,
                                      to_worker=nxt.id, why=f"{status} {msg.reason}")
                    self._forward_invite(inv, nxt)
                    return
            inv.final = status
            inv.expires = now + LINGER_S
            self._settle(inv)
            self._expire_dialog(inv.request.call_id, LINGER_S, only_worker=c.worker.id)
            self._log.info("sip_invite_failed", call_id=inv.request.call_id, worker=c.worker.id, status=status)
        data = self._relay(c, msg)  # the caller's ACK is forwarded to the worker with our branch
        if data is not None:
            inv.last_response = data

    def _relay(self, c: _Client, msg: SipMessage) -> bytes | None:
        """Pass a worker's response on: our Via off, to the next Via, the way the request came."""
        if c.origin is None:
            return None
        resp = msg.copy()
        resp.pop_via()
        try:
            nxt = resp.top_via
        except SipParseError as e:
            self._warn("sip_bad_response", error=f"next Via: {e}")
            return None
        if nxt is None:
            self._warn("sip_bad_response", error="response has no Via after ours")
            return None
        data = resp.to_bytes()
        self._send_response(c.origin, data, nxt)
        self._n["relayed"] += 1
        return data

    def _ack_worker(self, c: _Client, resp: SipMessage) -> None:
        """ACK a non-2xx final response we do not relay (RFC 3261 17.1.1.3): same branch as the
        INVITE, To from the response, so the worker stops retransmitting it."""
        ack = SipMessage(method="ACK", uri=c.request.uri)
        ack.headers.append(("Via", self._our_via(c.branch)))
        ack.headers.append(("Max-Forwards", "70"))
        for r in c.request.get_all("Route"):
            ack.headers.append(("Route", r))
        ack.headers.append(("From", c.request.get("From") or ""))
        ack.headers.append(("To", resp.get("To") or c.request.get("To") or ""))
        ack.headers.append(("Call-ID", c.request.get("Call-ID") or ""))
        cseq = c.request.cseq
        ack.headers.append(("CSeq", f"{cseq[0] if cseq else 1} ACK"))
        self._udp_send(ack.to_bytes(), c.worker.addr)

    def _hang_up_stray(self, c: _Client, resp: SipMessage) -> None:
        """A worker answered 2xx after we gave up on it (failover, timeout): ACK and BYE it, or
        it would hold a call slot for a call nobody is on."""
        try:
            contact = name_addr_uri(resp.get("Contact") or "") or c.request.uri or ""
        except SipParseError:
            contact = c.request.uri or ""
        cseq = c.request.cseq
        num = cseq[0] if cseq else 1
        for method, n in (("ACK", num), ("BYE", num + 1)):
            req = SipMessage(method=method, uri=contact)
            branch = new_branch("cb")
            req.headers += [("Via", self._our_via(branch)), ("Max-Forwards", "70"),
                            ("From", c.request.get("From") or ""), ("To", resp.get("To") or ""),
                            ("Call-ID", c.request.get("Call-ID") or ""), ("CSeq", f"{n} {method}")]
            data = req.to_bytes()
            if method == "BYE":
                self._put(self._clients, (branch, "BYE"),
                          _Client(branch, "BYE", data, req, c.worker, None, None,
                                  time.monotonic() + LINGER_S, local=True))
            self._udp_send(data, c.worker.addr)
        self._warn("sip_stray_answer_hung_up", worker=c.worker.id, call_id=c.request.call_id)

    # ------------------------------------------------------------------ output
    def _reply(self, req: SipMessage, origin: _Origin, via: Via, status: int, reason: str | None = None,
               headers: Sequence[tuple[str, str]] = ()) -> bytes:
        """Answer a request here; `req`'s top Via already carries received/rport."""
        data = make_response(req, status, reason, headers=headers).to_bytes()
        self._send_response(origin, data, via)
        if status >= 300:
            self._rejected[status] += 1
        return data

    def _send_response(self, origin: _Origin, data: bytes, via: Via) -> None:
        if origin.transport == "TCP":
            if origin.conn is not None and origin.conn.send(data):
                return
            self._spawn(self._tcp_connect_send(via.response_address(), data))  # RFC 3261 18.2.2: reconnect
            return
        self._udp_send(data, via.response_address())

    def _udp_send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._udp is None:
            return
        try:
            self._udp.sendto(data, addr)
        except (OSError, ValueError, TypeError) as e:
            self._warn("sip_send_failed", to=f"{addr[0]}:{addr[1]}", error=str(e))

    async def _tcp_connect_send(self, addr: tuple[str, int], data: bytes) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(addr[0], addr[1]), 3.0)
        except (TimeoutError, OSError) as e:
            self._warn("sip_send_failed", to=f"{addr[0]}:{addr[1]}", transport="TCP", error=str(e) or type(e).__name__)
            return
        conn = _Conn(writer, addr)
        conn.send(data)
        await self._serve_conn(reader, conn)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ housekeeping
    def _put(self, table: dict, key: Any, value: Any) -> None:
        """Insert, evicting the oldest entry past `max_entries` (a flood cannot grow memory)."""
        table.pop(key, None)
        table[key] = value
        while len(table) > self.max_entries:
            old_key = next(iter(table))
            self._drop(table, old_key)

    def _drop(self, table: dict, key: Any) -> None:
        v = table.pop(key, None)
        if isinstance(v, _Client):
            if v.timer is not None:
                v.timer.cancel()
            if v.index_key is not None and self._retrans.get(v.index_key) == key:
                del self._retrans[v.index_key]
        elif isinstance(v, _Invite):
            self._release(v)
            self._settle(v)
            if v.current is not None and v.current.timer is not None:
                v.current.timer.cancel()
                v.current.timer = None

    def sweep(self, now: float | None = None) -> None:
        """Forget expired transactions and dialogs (run every second by `start`)."""
        now = time.monotonic() if now is None else now
        for k in [k for k, c in self._clients.items() if c.expires <= now]:
            self._drop(self._clients, k)
        for k in [k for k, i in self._invites.items() if i.expires <= now]:
            self._drop(self._invites, k)
        for k in [k for k, ck in self._retrans.items() if ck not in self._clients]:
            del self._retrans[k]
        for k in [k for k, (_, exp) in self._dialogs.items() if exp <= now]:
            del self._dialogs[k]

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - keep sweeping
                self._n["internal_errors"] += 1
                self._log.exception("sip_internal_error", where="sweep")

    def _warn(self, event: str, **kw: Any) -> None:
        """Warnings about peers' traffic, at most 20 a second (a flood must not flood the log)."""
        sec = int(time.monotonic())
        window, logged, suppressed = self._warn_window
        if sec != window:
            window, logged = sec, 0
        if logged >= 20:
            self._warn_window = (window, logged, suppressed + 1)
            return
        if suppressed:
            kw["suppressed_before"] = suppressed
        self._warn_window = (window, logged + 1, 0)
        self._log.warning(event, **kw)
