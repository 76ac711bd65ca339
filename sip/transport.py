"""The dispatcher's SIP transport: the public port on UDP and TCP, framing, and what one TCP peer
may cost.

It turns bytes into parsed messages for its owner (`on_message(msg, origin)`; messages that do
not parse go to `on_bad(error, origin, first bytes)`) and sends what the owner hands back:
requests to workers over UDP, responses to callers the way their request came (a TCP caller
keeps its connection; one that closed is reconnected, RFC 3261 18.2.2). CRLF keep-alives are
counted and, on TCP, answered (RFC 5626).

Nothing a peer sends may take the listener down: an exception while handling one packet or
message is counted (`internal_errors`) and logged, and the next one is handled normally. TCP
connections are bounded (`TcpLimits`): without the limits each connection could buffer a 1 MiB
message and trickle it for the whole idle timeout, and connections were unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sip.message import SipMessage, SipParseError, StreamParser, Via, parse_message

__all__ = ["Connection", "Origin", "SipTransport", "TcpLimits"]

_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
_TCP_READ = 16 << 10  # bytes per read, and the StreamReader's buffer limit


@dataclass(frozen=True)
class TcpLimits:
    """What one TCP peer may cost (config [sip] tcp_*): without them each connection could buffer
    a 1 MiB message and trickle it for the whole idle timeout, and connections were unbounded."""

    max_connections: int = 512  # open at once, all sources together; more are closed at once
    max_connections_per_source: int = 32  # from one IP address
    max_message_bytes: int = 32 << 10  # header section, and body (Content-Length), each
    message_timeout_s: float = 10.0  # a message must be complete this long after its first byte


@dataclass(eq=False)
class Connection:
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
class Origin:
    """Where a request came from: responses go back the same way."""

    transport: str  # "UDP" or "TCP"
    addr: tuple[str, int]
    conn: Connection | None = None


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: SipTransport) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable etc.: the next send may work
        self.owner.log.debug("sip_udp_error", error=str(exc))


class SipTransport:
    """host:port on UDP and TCP (port 0: a free port, the same for both; see `.port` once started).

    `counts` is the dispatcher's counter (keepalives, parse errors, TCP refusals, internal errors),
    `warn` its rate-limited warning log."""

    def __init__(self, host: str, port: int, *, on_message: Callable[[SipMessage, Origin], None],
                 on_bad: Callable[[SipParseError, Origin, bytes], None], counts: Counter[str], log: Any,
                 warn: Callable[..., None], idle_timeout: float = 900.0, limits: TcpLimits | None = None) -> None:
        self.host = host
        self._want_port = port
        self.port = port
        self.on_message = on_message
        self.on_bad = on_bad
        self.counts = counts
        self.log = log
        self.warn = warn
        self.idle_timeout = idle_timeout
        self.limits = limits or TcpLimits()
        self.local_host = _WILDCARD.get(host, host)  # the address workers and callers reach us on
        self._via_host = ""
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._conns: set[Connection] = set()
        self._conns_by_ip: Counter[str] = Counter()
        self._tasks: set[asyncio.Task] = set()

    @property
    def connections(self) -> int:
        return len(self._conns)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
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
        host = self.local_host
        self._via_host = f"[{host}]" if ":" in host else host

    async def stop(self) -> None:
        """Close the connections and listeners and end the tasks sending on them (bounded time)."""
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

    # ------------------------------------------------------------------ output
    def via(self, branch: str) -> str:
        """Our Via header value for a request we send with `branch`."""
        return f"SIP/2.0/UDP {self._via_host}:{self.port};branch={branch}"

    def send_response(self, origin: Origin, data: bytes, via: Via) -> None:
        if origin.transport == "TCP":
            if origin.conn is not None and origin.conn.send(data):
                return
            self._spawn(self._tcp_connect_send(via.response_address(), data))  # RFC 3261 18.2.2: reconnect
            return
        self.send_udp(data, via.response_address())

    def send_udp(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._udp is None:
            return
        try:
            self._udp.sendto(data, addr)
        except (OSError, ValueError, TypeError) as e:
            self.warn("sip_send_failed", to=f"{addr[0]}:{addr[1]}", error=str(e))

    async def _tcp_connect_send(self, addr: tuple[str, int], data: bytes) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(addr[0], addr[1]), 3.0)
        except (TimeoutError, OSError) as e:
            self.warn("sip_send_failed", to=f"{addr[0]}:{addr[1]}", transport="TCP", error=str(e) or type(e).__name__)
            return
        conn = Connection(writer, addr)
        conn.send(data)
        await self._serve_conn(reader, conn)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ input
    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            if not data.strip(b"\r\n\t \x00"):
                self.counts["keepalives"] += 1  # RFC 5626 CRLF keep-alive (or an empty datagram)
                return
            origin = Origin("UDP", addr)
            try:
                msg = parse_message(data)
            except SipParseError as e:
                self.on_bad(e, origin, data[:80])
                return
            self.on_message(msg, origin)
        except Exception:  # noqa: BLE001 - no packet may take the listener down
            self.counts["internal_errors"] += 1
            self.log.exception("sip_internal_error", source=f"{addr[0]}:{addr[1]}", transport="UDP")

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        lim = self.limits
        why = ("connections" if len(self._conns) >= lim.max_connections
               else "connections_per_source" if self._conns_by_ip[peer[0]] >= lim.max_connections_per_source
               else None)
        if why is not None:  # closed at once: a connection costs memory until its first timeout
            self.counts["tcp_refused"] += 1
            self.warn("sip_tcp_refused", source=f"{peer[0]}:{peer[1]}", limit=why,
                      open=len(self._conns), from_source=self._conns_by_ip[peer[0]])
            writer.transport.abort()
            return
        await self._serve_conn(reader, Connection(writer, (peer[0], peer[1])))

    async def _serve_conn(self, reader: asyncio.StreamReader, conn: Connection) -> None:
        """Read SIP messages off one TCP connection until it closes, idles out, mis-frames, sends
        a message over the size limit or takes longer than `message_timeout_s` to send one."""
        self._conns.add(conn)
        self._conns_by_ip[conn.peer[0]] += 1
        origin = Origin("TCP", conn.peer, conn)
        lim = self.limits
        parser = StreamParser(max_header=lim.max_message_bytes, max_body=lim.max_message_bytes)
        pongs = 0
        started: float | None = None  # when the first byte of the message being read arrived
        try:
            while not conn.closed:
                timeout = self.idle_timeout
                if parser.in_message:
                    now = time.monotonic()
                    started = now if started is None else started
                    timeout = started + lim.message_timeout_s - now
                    if timeout <= 0:
                        self.counts["tcp_slow_messages"] += 1
                        self.warn("sip_tcp_message_timeout", source=f"{conn.peer[0]}:{conn.peer[1]}",
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
                        self.on_bad(e, origin, b"")
                        return  # the stream position is lost: close
                    if parser.pings > pongs:  # RFC 5626: a CRLF pong per CRLFCRLF ping
                        conn.send(b"\r\n" * (parser.pings - pongs))
                        pongs = parser.pings
                    if msg is None:
                        break
                    try:
                        self.on_message(msg, origin)
                    except Exception:  # noqa: BLE001 - no message may take the connection down
                        self.counts["internal_errors"] += 1
                        self.log.exception("sip_internal_error", source=f"{conn.peer[0]}:{conn.peer[1]}",
                                           transport="TCP")
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()
            self._conns.discard(conn)
            self._conns_by_ip[conn.peer[0]] -= 1
            if self._conns_by_ip[conn.peer[0]] <= 0:
                del self._conns_by_ip[conn.peer[0]]
