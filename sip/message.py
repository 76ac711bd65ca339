"""A small SIP message parser and serializer: the RFC 3261 syntax a proxy needs, nothing more.

The dispatcher reads headers (Via, Call-ID, CSeq, From/To tags, the request-URI user), edits a few
(pushes and pops its Via, decrements Max-Forwards), builds its own responses and looks at the SDP
offer's audio codecs. Everything else travels untouched: header lines keep their names, order and
text, so a forwarded message is the message received plus our edits. The workers read the INVITE
pjsua hands them with the same parser (identity headers, request-URI user), so both sides see
one request-URI user for a call.

Parsing is lenient where real phones are sloppy (folded lines, whitespace around ":" "/" ";" "=",
compact header names, bare LF line ends, CRLFs before a message on a stream) and strict where a
mistake would misroute or mis-frame a message (start line, Content-Length, Via). Failures raise
`SipParseError` with a message naming what is wrong and, when the start line and headers parsed,
the partly parsed message in `.partial`, so a proxy can still answer 400 to a request it can
route a response for.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote

__all__ = [
    "MAGIC_COOKIE",
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "SipTooLarge",
    "REASONS",
    "SdpCodec",
    "SipMessage",
    "SipParseError",
    "StreamParser",
    "Via",
    "canonical_name",
    "common_codecs",
    "make_response",
    "name_addr_uri",
    "new_branch",
    "new_tag",
    "parse_message",
    "parse_params",
    "sdp_audio_codecs",
    "split_list",
    "uri_user",
]

MAGIC_COOKIE = "z9hG4bK"  # RFC 3261 branch prefix: marks a branch as globally unique
MAX_HEADER_BYTES = 64 * 1024  # start line + headers; a stream that never ends its headers is an attack
MAX_BODY_BYTES = 1 << 20

# Compact forms (RFC 3261 7.3.3 and later extensions) -> full lower-case name.
_COMPACT = {
    "a": "accept-contact", "b": "referred-by", "c": "content-type", "d": "request-disposition",
    "e": "content-encoding", "f": "from", "i": "call-id", "j": "reject-contact", "k": "supported",
    "l": "content-length", "m": "contact", "n": "identity-info", "o": "event", "r": "refer-to",
    "s": "subject", "t": "to", "u": "allow-events", "v": "via", "x": "session-expires", "y": "identity",
}

REASONS: dict[int, str] = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued", 183: "Session Progress",
    200: "OK", 202: "Accepted", 300: "Multiple Choices", 301: "Moved Permanently", 302: "Moved Temporarily",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    406: "Not Acceptable", 408: "Request Timeout", 410: "Gone", 413: "Request Entity Too Large",
    414: "Request-URI Too Long", 415: "Unsupported Media Type", 416: "Unsupported URI Scheme",
    420: "Bad Extension", 480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist",
    482: "Loop Detected", 483: "Too Many Hops", 484: "Address Incomplete", 486: "Busy Here",
    487: "Request Terminated", 488: "Not Acceptable Here", 491: "Request Pending",
    500: "Server Internal Error", 501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Server Time-out", 505: "Version Not Supported", 513: "Message Too Large",
    600: "Busy Everywhere", 603: "Decline", 604: "Does Not Exist Anywhere", 606: "Not Acceptable",
}

_TOKEN = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+$")
_VERSION = re.compile(r"^SIP/\d+\.\d+$", re.IGNORECASE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE = re.compile(r"\r?\n")
_VIA = re.compile(
    r"^\s*(?P<proto>[A-Za-z0-9.\-]+)\s*/\s*(?P<ver>[0-9.]+)\s*/\s*(?P<transport>[A-Za-z0-9\-]+)\s+"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_]+)(?:\s*:\s*(?P<port>\d{1,5}))?\s*(?P<params>;.*)?$",
    re.DOTALL,
)


class SipParseError(ValueError):
    """A message that breaks SIP syntax. `partial` is the message as far as it parsed (start line
    and headers) when that much worked, so a request can still be answered with 400."""

    def __init__(self, message: str, partial: SipMessage | None = None) -> None:
        super().__init__(message)
        self.partial = partial


class SipTooLarge(SipParseError):
    """A message over the size limits: `status` is the answer, 413 (body, its headers parsed)
    or 513 (the message as a whole; no headers to answer with)."""

    def __init__(self, message: str, status: int, partial: SipMessage | None = None) -> None:
        super().__init__(message, partial)
        self.status = status


def canonical_name(name: str) -> str:
    """Lower-case full header name: compact forms expanded ("v" -> "via")."""
    n = name.strip().lower()
    return _COMPACT.get(n, n)


def new_tag() -> str:
    return secrets.token_hex(6)


def new_branch(prefix: str = "") -> str:
    """A branch that is unique for every request we send (RFC 3261 8.1.1.7)."""
    return f"{MAGIC_COOKIE}{prefix}{secrets.token_hex(8)}"


# --------------------------------------------------------------------------- small grammar helpers

def split_list(value: str, sep: str = ",") -> list[str]:
    """Split a header value on `sep` outside quoted strings and <...> (Via and Route values are
    comma lists; display names and URIs may contain commas and semicolons)."""
    out: list[str] = []
    buf: list[str] = []
    quoted = escaped = False
    angle = 0
    for ch in value:
        if quoted:
            buf.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch == "<":
            angle += 1
        elif ch == ">" and angle:
            angle -= 1
        elif ch == sep and not angle:
            out.append("".join(buf).strip())
            buf = []
            continue
        buf.append(ch)
    out.append("".join(buf).strip())
    return [p for p in out if p] if sep == "," else out


def parse_params(text: str) -> list[tuple[str, str | None]]:
    """";a=1;b ; c = x" -> [("a", "1"), ("b", None), ("c", "x")]; names lower-cased, values kept."""
    params: list[tuple[str, str | None]] = []
    for part in split_list(text, ";"):
        part = part.strip()
        if not part:
            continue
        name, eq, val = part.partition("=")
        params.append((name.strip().lower(), val.strip() if eq else None))
    return params


def _name_addr(value: str) -> tuple[str, str]:
    """(uri, header-params text) of a From/To/Contact/Route value, name-addr or addr-spec form."""
    v = value.strip()
    quoted = escaped = False
    for i, ch in enumerate(v):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            end = v.find(">", i)
            if end < 0:
                raise SipParseError(f"unterminated <...> in {value!r}")
            return v[i + 1:end].strip(), v[end + 1:]
    uri, sep, rest = v.partition(";")  # addr-spec: parameters after it belong to the header
    return uri.strip(), sep + rest


def name_addr_uri(value: str) -> str:
    """The URI of a From/To/Contact/Route value (angle brackets and display name removed)."""
    return _name_addr(value)[0]


def _header_param(value: str, name: str) -> str | None:
    for k, v in parse_params(_name_addr(value)[1]):
        if k == name:
            return v if v is not None else ""
    return None


def uri_user(uri: str) -> str:
    """The user part of a sip:/sips: URI ("sip:1000@host;x" -> "1000"), the number of a tel: URI,
    else "". Percent-escapes are decoded: routes are configured with plain user names."""
    u = uri.strip()
    if u.startswith("<") and u.endswith(">"):
        u = u[1:-1].strip()
    scheme, colon, rest = u.partition(":")
    if not colon:
        return ""
    scheme = scheme.lower()
    if scheme == "tel":
        return unquote(rest.split(";", 1)[0])
    if scheme not in ("sip", "sips"):
        return ""
    userinfo, at, _ = rest.partition("@")
    if not at:
        return ""
    return unquote(userinfo.split(":", 1)[0])


# --------------------------------------------------------------------------- Via

@dataclass
class Via:
    """One Via value. `params` keeps order and unknown parameters so a rewritten Via stays intact."""

    transport: str
    host: str
    port: int | None = None
    params: list[tuple[str, str | None]] = field(default_factory=list)
    protocol: str = "SIP/2.0"

    @classmethod
    def parse(cls, value: str) -> Via:
        m = _VIA.match(value)
        if not m:
            raise SipParseError(f"Via value {value.strip()!r} is not 'SIP/2.0/TRANSPORT host[:port][;params]'")
        proto = f"{m['proto'].upper()}/{m['ver']}"
        if proto != "SIP/2.0":
            raise SipParseError(f"Via protocol {proto!r} is not SIP/2.0")
        port = int(m["port"]) if m["port"] else None
        if port is not None and not 0 < port < 65536:
            raise SipParseError(f"Via port {port} out of range")
        host = m["host"]
        return cls(m["transport"].upper(), host, port, parse_params(m["params"] or ""), proto)

    def get(self, name: str) -> str | None:
        """A parameter's value; "" for a flag parameter (";rport"); None when absent."""
        for k, v in self.params:
            if k == name:
                return "" if v is None else v
        return None

    def set(self, name: str, value: str | None) -> None:
        for i, (k, _) in enumerate(self.params):
            if k == name:
                self.params[i] = (name, value)
                return
        self.params.append((name, value))

    @property
    def branch(self) -> str | None:
        return self.get("branch")

    @property
    def received(self) -> str | None:
        return self.get("received") or None

    @property
    def rport_requested(self) -> bool:
        return self.get("rport") is not None

    @property
    def rport(self) -> int | None:
        v = self.get("rport")
        return int(v) if v and v.isdigit() else None

    @property
    def bare_host(self) -> str:
        return self.host[1:-1] if self.host.startswith("[") else self.host

    def response_address(self) -> tuple[str, int]:
        """Where a response to this hop goes over UDP (RFC 3261 18.2.2 and RFC 3581): the
        `received` address if set, else the host; the `rport` value if set, else the port or 5060."""
        host = self.received or self.bare_host
        if host.startswith("["):
            host = host[1:-1]
        return host, self.rport or self.port or 5060

    def __str__(self) -> str:
        hostport = self.host if self.port is None else f"{self.host}:{self.port}"
        params = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.params)
        return f"{self.protocol}/{self.transport} {hostport}{params}"


# --------------------------------------------------------------------------- the message

@dataclass
class SipMessage:
    """A request (`method`, `uri`) or a response (`status`, `reason`). `headers` is the ordered list
    of (name as written, value); lookups are case-insensitive and know the compact forms."""

    method: str | None = None
    uri: str | None = None
    status: int | None = None
    reason: str = ""
    version: str = "SIP/2.0"
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    # -- kind
    @property
    def is_request(self) -> bool:
        return self.method is not None

    @property
    def is_response(self) -> bool:
        return self.status is not None

    def copy(self) -> SipMessage:
        return dataclasses.replace(self, headers=list(self.headers))

    def __repr__(self) -> str:
        start = f"{self.method} {self.uri}" if self.is_request else f"{self.status} {self.reason}"
        return f"<SipMessage {start} call-id={self.get('call-id')!r}>"

    # -- headers
    def get(self, name: str) -> str | None:
        """The first value of a header, or None."""
        want = canonical_name(name)
        for n, v in self.headers:
            if canonical_name(n) == want:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        """Every header line's value for `name`, in order (not split on commas)."""
        want = canonical_name(name)
        return [v for n, v in self.headers if canonical_name(n) == want]

    def get_list(self, name: str) -> list[str]:
        """Every element of a comma-list header (Via, Route, Record-Route), across lines."""
        return [e for v in self.get_all(name) for e in split_list(v)]

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    def joined(self, name: str) -> str | None:
        """Every value of `name` joined with ", " (RFC 3261 7.3.1 makes repeated header lines one
        comma list), or None."""
        values = self.get_all(name)
        return ", ".join(values) if values else None

    def extension_headers(self) -> dict[str, str]:
        """The X- headers, each once under its first spelling, repeated ones joined with ", ":
        what a call keeps of its INVITE (`metadata.sip.headers`)."""
        out: dict[str, str] = {}
        spelling: dict[str, str] = {}
        for n, v in self.headers:
            if not n.lower().startswith("x-"):
                continue
            key = spelling.setdefault(n.lower(), n)
            out[key] = f"{out[key]}, {v}" if key in out else v
        return out

    def remove(self, name: str) -> int:
        want = canonical_name(name)
        before = len(self.headers)
        self.headers = [(n, v) for n, v in self.headers if canonical_name(n) != want]
        return before - len(self.headers)

    def set(self, name: str, value: str) -> None:
        """Replace the first line of `name` (keeping its position), dropping the others; append if absent."""
        want = canonical_name(name)
        out: list[tuple[str, str]] = []
        done = False
        for n, v in self.headers:
            if canonical_name(n) == want:
                if not done:
                    out.append((n, value))
                    done = True
                continue
            out.append((n, v))
        if not done:
            out.append((name, value))
        self.headers = out

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        """Append a header line, or put it before every other line of the same name (`first`)."""
        if first:
            want = canonical_name(name)
            for i, (n, _) in enumerate(self.headers):
                if canonical_name(n) == want:
                    self.headers.insert(i, (name, value))
                    return
        self.headers.append((name, value))

    def set_list(self, name: str, values: list[str]) -> None:
        """Rewrite a comma-list header as one line per element at the first line's position."""
        want = canonical_name(name)
        idx = next((i for i, (n, _) in enumerate(self.headers) if canonical_name(n) == want), None)
        if idx is None:
            self.headers.extend((name, v) for v in values)
            return
        label = self.headers[idx][0]
        after = [(n, v) for n, v in self.headers[idx + 1:] if canonical_name(n) != want]
        self.headers = self.headers[:idx] + [(label, v) for v in values] + after

    # -- Via
    @property
    def vias(self) -> list[Via]:
        return [Via.parse(v) for v in self.get_list("via")]

    @property
    def top_via(self) -> Via | None:
        """The first Via value (parsed), None when there is no Via; raises SipParseError if bad."""
        first = self.get("via")
        if first is None:
            return None
        parts = split_list(first)
        if not parts:
            raise SipParseError("empty Via header")
        return Via.parse(parts[0])

    def push_via(self, via: Via | str) -> None:
        self.add("Via", str(via), first=True)

    def replace_top_via(self, via: Via | str) -> None:
        want = "via"
        for i, (n, v) in enumerate(self.headers):
            if canonical_name(n) == want:
                parts = split_list(v)
                parts[0] = str(via)
                self.headers[i] = (n, ", ".join(parts))
                return
        self.push_via(via)

    def pop_via(self) -> Via | None:
        """Remove and return the top Via value (a proxy relaying a response removes its own)."""
        for i, (n, v) in enumerate(self.headers):
            if canonical_name(n) == "via":
                parts = split_list(v)
                top = Via.parse(parts[0]) if parts else None
                if len(parts) > 1:
                    self.headers[i] = (n, ", ".join(parts[1:]))
                else:
                    del self.headers[i]
                return top
        return None

    # -- common fields
    @property
    def call_id(self) -> str | None:
        v = self.get("call-id")
        return v.strip() if v is not None and v.strip() else None

    @property
    def cseq(self) -> tuple[int, str] | None:
        """(number, METHOD), None when absent; raises SipParseError when malformed."""
        v = self.get("cseq")
        if v is None:
            return None
        parts = v.split()
        if len(parts) != 2 or not parts[0].isdigit() or not _TOKEN.match(parts[1]):
            raise SipParseError(f"CSeq {v.strip()!r} is not 'NUMBER METHOD'")
        num = int(parts[0])
        if num >= 2**31:
            raise SipParseError(f"CSeq number {num} is out of range (< 2**31)")
        return num, parts[1].upper()

    @property
    def from_tag(self) -> str | None:
        v = self.get("from")
        return _header_param(v, "tag") or None if v is not None else None

    @property
    def to_tag(self) -> str | None:
        v = self.get("to")
        return _header_param(v, "tag") or None if v is not None else None

    @property
    def request_user(self) -> str:
        return uri_user(self.uri or "")

    @property
    def max_forwards(self) -> int | None:
        """None when absent; raises SipParseError when not a number 0..255."""
        v = self.get("max-forwards")
        if v is None:
            return None
        s = v.strip()
        if not s.isdigit() or int(s) > 255:
            raise SipParseError(f"Max-Forwards {s!r} is not a number 0..255")
        return int(s)

    @property
    def content_type(self) -> str:
        """Media type without parameters, lower-case ("" when absent)."""
        v = self.get("content-type") or ""
        return v.split(";", 1)[0].strip().lower()

    # -- serialization
    def to_bytes(self) -> bytes:
        """Wire form. Content-Length is always written and always equals len(body)."""
        start = (f"{self.method} {self.uri} {self.version}" if self.is_request
                 else f"{self.version} {self.status} {self.reason}")
        lines = [start]
        wrote_cl = False
        for n, v in self.headers:
            if canonical_name(n) == "content-length":
                if wrote_cl:
                    continue
                v, wrote_cl = str(len(self.body)), True
            lines.append(f"{n}: {v}")
        if not wrote_cl:
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + self.body


# --------------------------------------------------------------------------- parsing

def _parse_head(head: bytes) -> tuple[SipMessage, str | None]:
    """Start line and headers. Returns the message and the first header error (if any): bad
    header lines are skipped so the rest can still be used to answer 400."""
    text = head.decode("utf-8", "surrogateescape")
    lines = _LINE.split(text)
    while lines and not lines[0].strip():  # CRLFs before the start line (RFC 3261 7.5)
        lines.pop(0)
    if not lines:
        raise SipParseError("empty message")
    start = lines[0]
    msg = SipMessage()
    if start[:4].upper() == "SIP/":
        parts = start.split(None, 2)
        if len(parts) < 2 or not _VERSION.match(parts[0]):
            raise SipParseError(f"bad status line {start[:80]!r}")
        if not (parts[1].isdigit() and len(parts[1]) == 3 and 100 <= int(parts[1]) <= 699):
            raise SipParseError(f"bad status code {parts[1][:20]!r} in status line")
        msg.version, msg.status = parts[0].upper(), int(parts[1])
        msg.reason = parts[2].strip() if len(parts) > 2 else ""
    else:
        parts = start.split()
        if len(parts) != 3:
            raise SipParseError(f"bad request line {start[:80]!r}: want 'METHOD URI SIP/2.0'")
        method, uri, version = parts
        if not _TOKEN.match(method):
            raise SipParseError(f"bad method {method[:40]!r} in request line")
        if not _VERSION.match(version):
            raise SipParseError(f"bad SIP version {version[:20]!r} in request line")
        if ":" not in uri:
            raise SipParseError(f"request-URI {uri[:80]!r} has no scheme")
        msg.method, msg.uri, msg.version = method, uri, version.upper()

    error: str | None = None
    for no, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        if line[0] in " \t":  # folded continuation (RFC 3261 7.3.1): joins the previous value
            if msg.headers:
                n, v = msg.headers[-1]
                msg.headers[-1] = (n, f"{v} {line.strip()}".strip())
            elif error is None:
                error = f"line {no}: continuation line before any header"
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not _TOKEN.match(name):
            if error is None:
                error = f"line {no}: not a header line: {line[:60]!r}"
            continue
        msg.headers.append((name, value.strip()))
    return msg, error


def _content_length(msg: SipMessage) -> int | None:
    values = {v.strip() for v in msg.get_all("content-length")}
    if not values:
        return None
    if len(values) > 1:
        raise SipParseError(f"conflicting Content-Length values {sorted(values)}", msg)
    v = values.pop()
    if not v.isdigit():
        raise SipParseError(f"Content-Length {v[:20]!r} is not a non-negative integer", msg)
    n = int(v)
    if n > MAX_BODY_BYTES:
        raise SipParseError(f"Content-Length {n} is larger than the {MAX_BODY_BYTES} bytes allowed", msg)
    return n


def parse_message(data: bytes) -> SipMessage:
    """Parse one datagram. A Content-Length shorter than the data drops the excess (RFC 3261
    18.3); longer than the data is an error; absent, the body is the rest of the datagram."""
    data = data.lstrip(b"\r\n")  # CRLFs before the start line (RFC 3261 7.5)
    m = _HEADER_END.search(data)
    if m:
        head, rest = data[:m.start()], data[m.end():]
    else:  # no blank line: headers only (tolerated on UDP), unless there is nothing at all
        head, rest = data.rstrip(b"\r\n"), b""
    if len(head) > MAX_HEADER_BYTES:
        raise SipParseError(f"header section of {len(head)} bytes is over {MAX_HEADER_BYTES}")
    msg, error = _parse_head(head)
    if error:
        raise SipParseError(error, msg)
    cl = _content_length(msg)
    if cl is None:
        msg.body = rest
    elif cl > len(rest):
        raise SipParseError(f"Content-Length {cl} exceeds the {len(rest)} body bytes received", msg)
    else:
        msg.body = rest[:cl]
    return msg


class StreamParser:
    """Frames SIP messages out of a TCP byte stream by Content-Length (RFC 3261 18.3).

    `feed()` bytes as they arrive, then call `pop()` until it returns None; several messages per
    read and messages split over reads both work. CRLFs between messages are skipped; a double
    CRLF is an RFC 5626 keep-alive ping, counted in `pings` (answer each with one CRLF). A framing
    error (bad Content-Length, oversized headers) raises SipParseError: the stream position is
    lost, so the connection must be closed. A missing Content-Length is taken as 0.
    """

    def __init__(self, max_header: int = MAX_HEADER_BYTES, max_body: int = MAX_BODY_BYTES) -> None:
        self._buf = bytearray()
        self.max_header = max_header
        self.max_body = max_body
        self.pings = 0
        self._head: SipMessage | None = None
        self._need = 0
        self.failed = False

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def in_message(self) -> bool:
        """Part of a message has arrived, not all of it (a CRLF keep-alive does not count)."""
        return self._head is not None or bool(self._buf.strip(b"\r\n"))

    def pop(self) -> SipMessage | None:
        if self.failed:
            raise SipParseError("stream already failed")
        if self._head is None:
            while self._buf[:1] in (b"\r", b"\n"):
                if self._buf.startswith(b"\r\n\r\n"):
                    self.pings += 1
                    del self._buf[:4]
                elif self._buf in (b"\r", b"\r\n", b"\r\n\r"):
                    return None  # maybe the start of a ping: wait for more
                elif self._buf.startswith(b"\r\n"):
                    del self._buf[:2]
                else:
                    del self._buf[:1]
            if not self._buf:
                return None
            m = _HEADER_END.search(self._buf)
            if m is None:
                if len(self._buf) > self.max_header:
                    self.failed = True
                    raise SipTooLarge(f"no end of headers within {self.max_header} bytes", 513)
                return None
            if m.start() > self.max_header:
                self.failed = True
                raise SipTooLarge(f"header section of {m.start()} bytes is over {self.max_header}", 513)
            head = bytes(self._buf[:m.start()])
            del self._buf[:m.end()]
            try:
                msg, error = _parse_head(head)
                if error:
                    raise SipParseError(error, msg)
                self._need = _content_length(msg) or 0
            except SipParseError:
                self.failed = True
                raise
            if self._need > self.max_body:
                self.failed = True
                raise SipTooLarge(f"Content-Length {self._need} is over the {self.max_body} bytes allowed", 413, msg)
            self._head = msg
        if len(self._buf) < self._need:
            return None
        msg, self._head = self._head, None
        msg.body = bytes(self._buf[:self._need])
        del self._buf[:self._need]
        return msg


# --------------------------------------------------------------------------- responses

def make_response(request: SipMessage, status: int, reason: str | None = None, *,
                  to_tag: str | None = None, headers: Iterable[tuple[str, str]] = ()) -> SipMessage:
    """A response to `request` (RFC 3261 8.2.6.2): its Via lines, From, To (plus a To-tag for
    every status but 100 when the request had none), Call-ID and CSeq, then `headers`
    (e.g. Retry-After, Warning, Allow), and Content-Length 0."""
    if not request.is_request:
        raise ValueError("make_response needs a request")
    resp = SipMessage(status=status, reason=reason if reason is not None else REASONS.get(status, "Unknown"))
    for n, v in request.headers:
        c = canonical_name(n)
        if c == "via":
            resp.headers.append(("Via", v))
    for name in ("From", "To", "Call-ID", "CSeq"):
        v = request.get(name)
        if v is None:
            continue
        if name == "To" and status != 100 and _safe_tag(v) is None:
            v = f"{v};tag={to_tag or new_tag()}"
        resp.headers.append((name, v))
    resp.headers.extend(headers)
    resp.headers.append(("Content-Length", "0"))
    return resp


def _safe_tag(to_value: str) -> str | None:
    try:
        return _header_param(to_value, "tag") or None
    except SipParseError:
        return None


# --------------------------------------------------------------------------- SDP

# RFC 3551 static payload types (audio). G722 is 16 kHz audio but its RTP clock is 8000 (RFC 3551 4.5.2).
_STATIC_PT = {
    0: ("PCMU", 8000), 3: ("GSM", 8000), 4: ("G723", 8000), 5: ("DVI4", 8000), 6: ("DVI4", 16000),
    7: ("LPC", 8000), 8: ("PCMA", 8000), 9: ("G722", 8000), 10: ("L16", 44100), 11: ("L16", 44100),
    12: ("QCELP", 8000), 13: ("CN", 8000), 14: ("MPA", 90000), 15: ("G728", 8000), 16: ("DVI4", 11025),
    17: ("DVI4", 22050), 18: ("G729", 8000),
}


@dataclass(frozen=True)
class SdpCodec:
    pt: int
    name: str
    rate: int
    channels: int = 1

    def __str__(self) -> str:
        return f"{self.name}/{self.rate}" + (f"/{self.channels}" if self.channels != 1 else "")


def sdp_audio_codecs(body: bytes | str) -> list[SdpCodec]:
    """The audio codecs of every active m=audio line, in offer order. Static payload types need no
    rtpmap; a dynamic type without one is skipped (unknowable), except the customary 101 =
    telephone-event. A disabled stream (port 0) offers nothing."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    out: list[SdpCodec] = []
    section: list[int] | None = None  # payload types of the current m=audio, None outside one
    rtpmap: dict[int, tuple[str, int, int]] = {}

    def flush() -> None:
        if section is None:
            return
        for pt in section:
            if pt in rtpmap:
                name, rate, ch = rtpmap[pt]
            elif pt in _STATIC_PT:
                name, rate = _STATIC_PT[pt]
                ch = 1
            elif pt == 101:
                name, rate, ch = "telephone-event", 8000, 1
            else:
                continue
            out.append(SdpCodec(pt, name, rate, ch))

    for raw in _LINE.split(text):
        line = raw.strip()
        if line.startswith("m="):
            flush()
            rtpmap = {}
            fields = line[2:].split()
            section = None
            if len(fields) >= 4 and fields[0].lower() == "audio" and fields[1].split("/")[0] != "0":
                section = [int(f) for f in fields[3:] if f.isdigit() and int(f) < 128]
        elif line.startswith("a=rtpmap:") and section is not None:
            pt_text, _, enc = line[len("a=rtpmap:"):].partition(" ")
            bits = enc.strip().split("/")
            if pt_text.isdigit() and bits[0]:
                rate = int(bits[1]) if len(bits) > 1 and bits[1].isdigit() else 8000
                ch = int(bits[2]) if len(bits) > 2 and bits[2].isdigit() else 1
                rtpmap[int(pt_text)] = (bits[0], rate, ch)
    flush()
    return out


def common_codecs(offered: Iterable[SdpCodec | str], accepted: Iterable[str]) -> list[str]:
    """The `accepted` entries ("PCMU/8000", "G722/16000") whose encoding name is in the offer.
    Names compare case-insensitively and rates are ignored: G722 is "G722/8000" in SDP (the RFC
    3551 clock-rate quirk) but configured as its real 16 kHz rate."""
    names = {(c.name if isinstance(c, SdpCodec) else c.split("/", 1)[0]).strip().lower() for c in offered}
    return [a for a in accepted if a.split("/", 1)[0].strip().lower() in names]
