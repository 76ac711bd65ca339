"""sip.message: RFC 3261 syntax as real peers send it, in the style of the RFC 4475 torture tests
(whitespace, folding, compact forms, odd case), plus the malformed messages a proxy must refuse."""

from __future__ import annotations

import pytest

from sip.message import (
    SdpCodec,
    SipMessage,
    SipParseError,
    StreamParser,
    Via,
    common_codecs,
    make_response,
    parse_message,
    sdp_audio_codecs,
    split_list,
    uri_user,
)
from sip.routing import RouteError, Router, call_slots


def wire(text: str, body: str = "") -> bytes:
    """Message text with LF line ends -> CRLF wire form (body appended as is)."""
    return text.strip("\n").replace("\n", "\r\n").encode() + b"\r\n\r\n" + body.encode()


SDP = ("v=0\r\no=- 1 1 IN IP4 192.0.2.4\r\ns=-\r\nc=IN IP4 192.0.2.4\r\nt=0 0\r\n"
       "m=audio 49217 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n")

# RFC 4475 3.1.1.1 ("wsinv") in spirit: a valid INVITE that uses every whitespace liberty.
WSINV = (
    "INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0\r\n"
    "TO :\r\n sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n\r\n"
    'from   : "J Rosenberg \\\\\\""       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8\r\n'
    "MaX-fOrWaRdS: 0068\r\n"
    "Call-ID: wsinv.ndaksdj@192.0.2.1\r\n"
    "Content-Length   : 150\r\n"
    "cseq: 0009\r\n  INVITE\r\n"
    "Via  : SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw\r\n"
    "s :\r\n"
    "NewFangledHeader:   newfangled value\r\n continued newfangled value\r\n"
    "UnknownHeaderWithUnusualValue: ;;,,;;,;\r\n"
    "Content-Type: application/sdp\r\n"
    "Route:\r\n <sip:services.example.com;lr;unknownwith=value;unknown-no-value>\r\n"
    "v:  SIP  / 2.0  / TCP     spindle.example.com   ;\r\n  branch  =   z9hG4bK9ikj8  ,\r\n"
    " SIP  /    2.0   / UDP  192.168.255.111   ; branch=\r\n z9hG4bK30239\r\n"
    'm:"Quoted string \\"\\"" <sip:jdrosen@example.com> ; newparam =\r\n      newvalue ;\r\n'
    "  secondparam ; q = 0.33\r\n"
    "\r\n"
    "v=0\r\no=mhandley 29739 7272939 IN IP4 192.0.2.3\r\ns=-\r\nc=IN IP4 192.0.2.4\r\nt=0 0\r\n"
    "m=audio 49217 RTP/AVP 0 12\r\nm=video 3227 RTP/AVP 31\r\na=rtpmap:31 LPC\r\n"
)


def test_torture_whitespace_folding_compact_forms() -> None:
    raw = WSINV.encode()
    _, _, body = raw.partition(b"\r\n\r\n")
    raw = raw.replace(b"Content-Length   : 150", f"Content-Length   : {len(body)}".encode())
    m = parse_message(raw)
    assert (m.method, m.uri, m.version) == ("INVITE", "sip:vivekg@chair-dnrc.example.com;unknownparam", "SIP/2.0")
    assert m.call_id == "wsinv.ndaksdj@192.0.2.1"
    assert m.cseq == (9, "INVITE")
    assert m.max_forwards == 68
    assert m.to_tag == "1918181833n"
    assert m.from_tag == "98asjd8"
    assert m.get("newfangledheader") == "newfangled value continued newfangled value"
    assert m.get("Subject") == ""  # "s" is Subject's compact form
    assert m.get("contact").startswith('"Quoted string')  # "m" is Contact
    vias = m.vias  # three values over two lines, one of them a compact "v"
    assert [(v.transport, v.host, v.branch) for v in vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert m.body == body
    assert [str(c) for c in sdp_audio_codecs(m.body)] == ["PCMU/8000", "QCELP/8000"]
    assert m.request_user == "vivekg"


def test_case_insensitive_names_and_compact_forms_are_one_header() -> None:
    m = parse_message(wire("""
OPTIONS sip:user@example.com SIP/2.0
v: SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKa
VIA: SIP/2.0/TCP 192.0.2.9;branch=z9hG4bKb
f: <sip:a@example.com>;tag=x
t: sip:user@example.com
i: abc@192.0.2.1
CSEQ: 1 OPTIONS
l: 0
"""))
    assert m.get("Via") == "SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKa"
    assert m.get_all("via") == ["SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKa", "SIP/2.0/TCP 192.0.2.9;branch=z9hG4bKb"]
    assert m.get("call-ID") == m.get("I") == "abc@192.0.2.1"
    assert m.get("content-length") == "0"
    assert m.to_tag is None and m.from_tag == "x"
    top = m.top_via
    assert top is not None and (top.host, top.port, top.branch) == ("192.0.2.1", 5070, "z9hG4bKa")


def test_round_trip_keeps_header_order_and_fixes_content_length() -> None:
    raw = wire("""
INVITE sip:1000@10.0.0.1 SIP/2.0
Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK1;rport
Max-Forwards: 70
From: "Alice" <sip:alice@10.0.0.2>;tag=a1
To: <sip:1000@10.0.0.1>
Call-ID: c1
CSeq: 1 INVITE
X-Ticket: 42
Content-Type: application/sdp
Content-Length: 999
""", SDP)
    with pytest.raises(SipParseError, match="Content-Length 999 exceeds"):
        parse_message(raw)
    m = parse_message(raw.replace(b"999", str(len(SDP)).encode()))
    out = m.to_bytes()
    assert out == raw.replace(b"999", str(len(SDP)).encode())
    m.body = b"v=0\r\n"
    again = parse_message(m.to_bytes())
    assert again.get("Content-Length") == "5" and again.body == b"v=0\r\n"
    assert [n for n, _ in again.headers][:3] == ["Via", "Max-Forwards", "From"]


def test_via_push_pop_received_rport() -> None:
    m = parse_message(wire("""
INVITE sip:x@h SIP/2.0
Via: SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKa;rport, SIP/2.0/UDP 192.0.2.2;branch=z9hG4bKb
From: <sip:a@h>;tag=1
To: <sip:x@h>
Call-ID: c
CSeq: 1 INVITE
"""))
    top = m.top_via
    assert top is not None and top.rport_requested and top.rport is None
    top.set("rport", "40000")
    top.set("received", "203.0.113.5")
    m.replace_top_via(top)
    assert m.top_via.response_address() == ("203.0.113.5", 40000)
    m.push_via(Via.parse("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKours"))
    assert [v.branch for v in m.vias] == ["z9hG4bKours", "z9hG4bKa", "z9hG4bKb"]
    popped = m.pop_via()
    assert popped is not None and popped.branch == "z9hG4bKours"
    assert m.pop_via().branch == "z9hG4bKa"  # first of a comma list: the line keeps the rest
    assert m.get_all("Via") == ["SIP/2.0/UDP 192.0.2.2;branch=z9hG4bKb"]
    assert m.top_via.response_address() == ("192.0.2.2", 5060)  # no port: 5060


def test_response_parsing_no_reason_phrase_and_odd_reason() -> None:
    m = parse_message(b"SIP/2.0 100 \r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx\r\nCSeq: 1 INVITE\r\n"
                      b"Call-ID: c\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nContent-Length: 0\r\n\r\n")
    assert m.is_response and m.status == 100 and m.reason == ""
    m = parse_message(wire("""
SIP/2.0 200 = 2**3 * 5**2 \u043d\u043e
Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx
CSeq: 1 INVITE
Call-ID: c
From: <sip:a@b>;tag=1
To: <sip:c@d>;tag=2
"""))
    assert m.status == 200 and m.reason.startswith("= 2**3") and m.to_tag == "2"
    assert b"\xd0\xbd\xd0\xbe" in m.to_bytes()  # UTF-8 reason phrase survives the round trip


@pytest.mark.parametrize("raw, error", [
    (b"\x00\x01\x02garbage\xff\r\n\r\n", "bad request line"),
    (b"INVITE sip:x@h\r\nVia: SIP/2.0/UDP h\r\n\r\n", "bad request line"),
    (b"INVITE x@h SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n\r\n", "has no scheme"),
    (b"INVITE sip:x@h SIP/7.0x\r\n\r\n", "bad SIP version"),
    (b"SIP/2.0 99 Bad\r\n\r\n", "bad status code"),
    (b"SIP/2.0 OK\r\n\r\n", "bad status code"),
    (b"", "empty message"),
])
def test_garbage_is_a_clear_parse_error(raw: bytes, error: str) -> None:
    with pytest.raises(SipParseError, match=error):
        parse_message(raw)


def test_bad_header_line_keeps_partial_message_for_a_400() -> None:
    raw = wire("""
INVITE sip:x@h SIP/2.0
Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKq
this line has no colon
Call-ID: q
CSeq: 1 INVITE
""")
    with pytest.raises(SipParseError, match="line 3: not a header line") as e:
        parse_message(raw)
    assert e.value.partial is not None and e.value.partial.call_id == "q"
    assert e.value.partial.top_via.branch == "z9hG4bKq"


@pytest.mark.parametrize("cl, error", [
    ("-3", "not a non-negative integer"),  # RFC 4475 "ncl"
    ("abc", "not a non-negative integer"),
    ("99999999999999999999", "larger than"),  # "scalar02"
    ("50", "exceeds"),  # "clerr": more than was received
])
def test_bad_content_length(cl: str, error: str) -> None:
    raw = wire(f"""
INVITE sip:x@h SIP/2.0
Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKq
Call-ID: q
CSeq: 1 INVITE
Content-Length: {cl}
""", "v=0\r\n")
    with pytest.raises(SipParseError, match=error) as e:
        parse_message(raw)
    assert e.value.partial is not None and e.value.partial.method == "INVITE"


def test_conflicting_content_lengths_and_excess_datagram_bytes() -> None:
    base = "OPTIONS sip:x@h SIP/2.0\nVia: SIP/2.0/UDP h;branch=z9hG4bKq\nCall-ID: q\nCSeq: 1 OPTIONS\n"
    with pytest.raises(SipParseError, match="conflicting Content-Length"):
        parse_message(wire(base + "Content-Length: 2\nl: 3\n", "abc"))
    m = parse_message(wire(base + "Content-Length: 2\n", "abcdef"))  # excess datagram bytes dropped
    assert m.body == b"ab"
    m = parse_message(wire(base, "abcdef"))  # no Content-Length on UDP: the rest of the datagram
    assert m.body == b"abcdef"


def test_bare_lf_line_ends_and_leading_crlf() -> None:
    m = parse_message(b"\r\n\r\nOPTIONS sip:x@h SIP/2.0\nVia: SIP/2.0/UDP h;branch=z9hG4bKq\nCall-ID: q\n"
                      b"CSeq: 2 OPTIONS\nContent-Length: 0\n\n")
    assert m.method == "OPTIONS" and m.cseq == (2, "OPTIONS")


def test_malformed_fields_raise_named_errors() -> None:
    m = parse_message(wire("""
INVITE sip:x@h SIP/2.0
Via: SIP/2.0/UDP
Call-ID: q
CSeq: one INVITE
Max-Forwards: many
"""))
    with pytest.raises(SipParseError, match="Via value"):
        _ = m.top_via
    with pytest.raises(SipParseError, match="CSeq"):
        _ = m.cseq
    with pytest.raises(SipParseError, match="Max-Forwards"):
        _ = m.max_forwards
    with pytest.raises(SipParseError, match="not SIP/2.0"):
        Via.parse("SIP/3.0/UDP h")


def test_stream_parser_frames_several_messages_partial_reads_and_pings() -> None:
    one = wire("""
OPTIONS sip:x@h SIP/2.0
Via: SIP/2.0/TCP h;branch=z9hG4bK1
Call-ID: a
CSeq: 1 OPTIONS
Content-Length: 3
""", "abc")
    two = wire(f"""
INVITE sip:y@h SIP/2.0
Via: SIP/2.0/TCP h;branch=z9hG4bK2
Call-ID: b
CSeq: 1 INVITE
Content-Type: application/sdp
Content-Length: {len(SDP)}
""", SDP)
    stream = b"\r\n\r\n" + one + b"\r\n" + two + b"\r\n\r\n"
    p = StreamParser()
    got: list[SipMessage] = []
    for i in range(0, len(stream), 7):  # 7-byte reads split everything, headers and body
        p.feed(stream[i:i + 7])
        while (m := p.pop()) is not None:
            got.append(m)
    assert [(m.method, m.call_id) for m in got] == [("OPTIONS", "a"), ("INVITE", "b")]
    assert got[0].body == b"abc" and got[1].body == SDP.encode()
    assert p.pings == 2 and p.buffered == 0
    p.feed(one + two)  # two messages in one read
    assert p.pop().call_id == "a" and p.pop().call_id == "b" and p.pop() is None


def test_stream_parser_bad_content_length_fails_the_stream() -> None:
    p = StreamParser()
    p.feed(b"INVITE sip:x@h SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nCall-ID: a\r\n"
           b"CSeq: 1 INVITE\r\nContent-Length: lots\r\n\r\nbody")
    with pytest.raises(SipParseError, match="Content-Length") as e:
        p.pop()
    assert e.value.partial is not None and e.value.partial.call_id == "a"
    with pytest.raises(SipParseError, match="already failed"):
        p.pop()


def test_stream_parser_refuses_endless_headers() -> None:
    p = StreamParser(max_header=1024)
    p.feed(b"INVITE sip:x@h SIP/2.0\r\n" + b"X-Pad: " + b"a" * 2000)
    with pytest.raises(SipParseError, match="no end of headers"):
        p.pop()


def test_make_response_copies_the_right_headers() -> None:
    req = parse_message(wire("""
INVITE sip:1000@h SIP/2.0
Via: SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKa;received=198.51.100.1;rport=1234
Via: SIP/2.0/UDP 192.0.2.2;branch=z9hG4bKb
Max-Forwards: 70
From: <sip:a@h>;tag=f1
To: <sip:1000@h>
Call-ID: c1
CSeq: 7 INVITE
Contact: <sip:a@192.0.2.1:5070>
Content-Type: application/sdp
""", SDP))
    trying = make_response(req, 100)
    assert trying.status == 100 and trying.reason == "Trying" and trying.to_tag is None
    busy = make_response(req, 503, headers=[("Retry-After", "5")])
    assert busy.reason == "Service Unavailable" and busy.to_tag
    assert busy.get_all("Via") == req.get_all("Via")
    assert (busy.call_id, busy.cseq, busy.from_tag) == ("c1", (7, "INVITE"), "f1")
    assert busy.get("Retry-After") == "5" and busy.body == b"" and busy.get("Contact") is None
    wire_form = busy.to_bytes()
    assert wire_form.startswith(b"SIP/2.0 503 Service Unavailable\r\n") and b"Content-Length: 0\r\n\r\n" in wire_form
    assert make_response(req, 488, "Not Here", to_tag="t9").to_tag == "t9"
    assert parse_message(make_response(req, 200).to_bytes()).to_tag  # parses back


def test_header_editing() -> None:
    m = SipMessage(method="BYE", uri="sip:x@h")
    m.add("Route", "<sip:a;lr>, <sip:b;lr>")
    m.add("Max-Forwards", "70")
    assert m.get_list("Route") == ["<sip:a;lr>", "<sip:b;lr>"]
    m.set_list("Route", ["<sip:b;lr>"])
    assert m.get_all("route") == ["<sip:b;lr>"] and m.headers[0][0] == "Route"
    m.set("max-forwards", "69")
    assert m.headers[1] == ("Max-Forwards", "69")
    assert m.remove("ROUTE") == 1 and m.get("Route") is None


def test_split_list_respects_quotes_and_brackets() -> None:
    assert split_list('"Doe, John" <sip:j@h;a=1,2>, <sip:k@h>') == ['"Doe, John" <sip:j@h;a=1,2>', "<sip:k@h>"]


@pytest.mark.parametrize("uri, user", [
    ("sip:1000@10.0.0.1:5060;transport=udp", "1000"),
    ("<sips:alice:secret@example.com>", "alice"),
    ("sip:%61lice@h", "alice"),
    ("sip:example.com", ""),
    ("tel:+15551234;phone-context=x", "+15551234"),
    ("mailto:a@b", ""),
])
def test_uri_user(uri: str, user: str) -> None:
    assert uri_user(uri) == user


def test_sdp_codecs_static_dynamic_and_disabled_streams() -> None:
    sdp = ("v=0\r\nm=audio 4000 RTP/AVP 9 18 3 96 101 97\r\na=rtpmap:96 opus/48000/2\r\n"
           "a=rtpmap:101 telephone-event/8000\r\nm=audio 0 RTP/AVP 0\r\nm=video 5000 RTP/AVP 0\r\n")
    codecs = sdp_audio_codecs(sdp.encode())
    assert [str(c) for c in codecs] == ["G722/8000", "G729/8000", "GSM/8000", "opus/48000/2", "telephone-event/8000"]
    assert codecs[0] == SdpCodec(9, "G722", 8000)  # G722's RTP clock is 8000 (RFC 3551 quirk)
    ours = ("PCMU/8000", "PCMA/8000", "G722/16000")
    assert common_codecs(codecs, ours) == ["G722/16000"]  # matched by name despite the rate
    assert common_codecs(sdp_audio_codecs(b"m=audio 1 RTP/AVP 3\r\n"), ours) == []
    assert common_codecs(["pcma/8000"], ours) == ["PCMA/8000"]
    assert sdp_audio_codecs(b"not sdp at all") == []


def _invite(uri: str, *headers: str) -> SipMessage:
    return parse_message(("\r\n".join([f"INVITE {uri} SIP/2.0", "Via: SIP/2.0/UDP h;branch=z9hG4bK1",
                                       "Call-ID: c", "CSeq: 1 INVITE", *headers]) + "\r\n\r\n").encode())


@pytest.mark.parametrize("uri, slots", [
    ("tel:+15551234;phone-context=example.com", 2),
    ("tel:%2B15551234", 2),
    ("sip:%2A72%23@10.0.0.1;user=phone", 2),
    ("sips:sal%65s@h", 2),
    ("sip:+15551234@h", 2),
    ("sip:other@h", 1),
    ("tel:+15559999", 1),
])
def test_bridge_decision_on_request_uri(uri: str, slots: int) -> None:
    """The one bridging decision the dispatcher (slots) and the worker (outbound leg) both make:
    tel: numbers and percent-encoded users match their routes."""
    router = Router({"+15551234": "sip:agent@a", "*72#": "sip:agent@a", "sales": "sip:agent@a"})
    target = router.bridge_target(_invite(uri))
    assert call_slots(target) == slots and (target == "sip:agent@a") == (slots == 2)


def test_bridge_decision_target_header() -> None:
    """The first non-empty target header wins over routes, only where allowed; any spelling of its
    name; a target that is not a SIP URI is a RouteError (answered 400 by both sides)."""
    invite = _invite("sip:other@h", "x-callbridge-target:  ", "X-Callbridge-Target: <sip:b@h2>",
                     "X-Callbridge-Target: <sip:c@h3>")
    assert Router({"*": "sip:star@h"}, allow_target_header=True).bridge_target(invite) == "sip:b@h2"
    assert Router({"*": "sip:star@h"}).bridge_target(invite) == "sip:star@h"
    with pytest.raises(RouteError):
        Router({}, allow_target_header=True).bridge_target(_invite("sip:o@h", "X-Callbridge-Target: tel:1"))


def test_extension_headers_and_joined_values() -> None:
    """What a worker keeps of the INVITE: X- headers under their first spelling, repeats joined."""
    invite = _invite("sip:o@h", "X-Ticket: 1", "m: <sip:a@h>", "x-ticket: 2", "Contact: <sip:b@h>", "X-Empty:")
    assert invite.extension_headers() == {"X-Ticket": "1, 2", "X-Empty": ""}
    assert invite.joined("Contact") == "<sip:a@h>, <sip:b@h>" and invite.joined("Subject") is None
