"""sip.dispatcher over real loopback sockets. The callers and the "workers" are UDP/TCP sockets
owned by each test, which plays the worker's SIP role (receives the forwarded request and
answers it): this checks the dispatcher's own forwarding, routing and refusals."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

import pytest

from sip.dispatcher import ALLOW, Dispatcher, TcpLimits, Worker
from sip.message import SipMessage, StreamParser, make_response, parse_message
from sip.routing import Router

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
       "a=rtpmap:101 telephone-event/8000\r\n")
SDP_GSM = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 3\r\n"
_ids = itertools.count(1)


class Peer(asyncio.DatagramProtocol):
    """A UDP socket owned by the test: a caller, or a worker answering what it is sent."""

    def __init__(self) -> None:
        self.q: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.q.put_nowait((data, addr))

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    async def recv(self, timeout: float = 2.0) -> SipMessage:
        data, _ = await asyncio.wait_for(self.q.get(), timeout)
        return parse_message(data)

    async def expect(self, what: int | str, timeout: float = 2.0) -> SipMessage:
        """The next message, which must be a response with status `what` or a `what` request."""
        m = await self.recv(timeout)
        got = m.status if m.is_response else m.method
        assert got == what, f"expected {what}, got {got} {m.reason if m.is_response else m.uri}"
        return m

    async def expect_final(self, status: int, timeout: float = 10.0) -> SipMessage:
        """The INVITE's final response, which must be `status`, past its provisional ones (100 Trying
        comes first when the service's admission check is awaited)."""
        while True:
            m = await self.recv(timeout)
            if not (m.is_response and (m.status or 0) < 200):
                break
        assert m.is_response and m.status == status, f"expected {status}, got {m.status or m.method} {m.reason}"
        return m

    async def silent(self, within: float = 0.25) -> None:
        try:
            data, _ = await asyncio.wait_for(self.q.get(), within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message: {data[:80]!r}")

    def answer(self, req: SipMessage, status: int, *, tag: str = "wtag", headers: Iterable[tuple[str, str]] = ()) -> None:
        """Answer like a UAS would: to the top Via (the dispatcher's)."""
        resp = make_response(req, status, to_tag=tag, headers=list(headers))
        if 200 <= status < 300 and req.method == "INVITE":
            resp.headers.insert(-1, ("Contact", f"<sip:worker@{HOST}:{self.port}>"))
        via = req.top_via
        assert via is not None
        self.send(resp.to_bytes(), via.response_address())


def request(method: str, port: int, *, call_id: str, branch: str | None = None, user: str = "1000", cseq: int = 1,
            to_tag: str | None = None, body: str = "", transport: str = "UDP", extra: Iterable[str] = (),
            omit: Iterable[str] = (), content_type: str = "application/sdp") -> bytes:
    branch = branch or f"z9hG4bKcaller{next(_ids)}"
    lines = [f"{method} sip:{user}@{HOST} SIP/2.0",
             f"Via: SIP/2.0/{transport} {HOST}:{port};branch={branch};rport",
             "Max-Forwards: 70",
             f'From: "Caller" <sip:caller@{HOST}:{port}>;tag=c-{call_id}',
             f"To: <sip:{user}@{HOST}>" + (f";tag={to_tag}" if to_tag else ""),
             f"Call-ID: {call_id}",
             f"CSeq: {cseq} {method}",
             f"Contact: <sip:caller@{HOST}:{port}>",
             *extra]
    if body:
        lines.append(f"Content-Type: {content_type}")
    skip = {o.lower() for o in omit}
    lines = [ln for ln in lines if ln.split(":", 1)[0].lower() not in skip]
    lines.append(f"Content-Length: {len(body.encode())}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


@dataclass
class Rig:
    d: Dispatcher
    caller: Peer
    workers: list[Peer]

    @property
    def addr(self) -> tuple[str, int]:
        return HOST, self.d.port

    def invite(self, call_id: str, **kw) -> bytes:
        data = request("INVITE", self.caller.port, call_id=call_id, body=kw.pop("body", SDP), **kw)
        self.caller.send(data, self.addr)
        return data


async def _peer() -> Peer:
    _, p = await asyncio.get_running_loop().create_datagram_endpoint(Peer, local_addr=(HOST, 0))
    return p


@pytest.fixture
async def make_rig() -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    made: list[Rig] = []

    async def make(n: int = 2, capacity: int = 4, router: Router | None = None, **kw) -> Rig:
        workers = [await _peer() for _ in range(n)]
        d = Dispatcher(HOST, 0, [Worker(id=i, host=HOST, port=w.port, capacity=capacity) for i, w in enumerate(workers)],
                       router or Router({}), codecs=("PCMU/8000", "PCMA/8000", "G722/16000"), **kw)
        await d.start()
        for i in range(n):
            d.set_alive(i, True)
        rig = Rig(d, await _peer(), workers)
        made.append(rig)
        return rig

    yield make
    for r in made:
        await r.d.stop()
        for p in [r.caller, *r.workers]:
            assert p.transport is not None
            p.transport.close()


async def test_invite_goes_to_least_loaded_worker_with_our_via_and_100_trying(make_rig) -> None:
    rig = await make_rig(3)
    rig.d.set_load(0, 2)
    rig.d.set_load(1, 1)
    rig.d.set_load(2, 3)
    rig.invite("call-a")
    trying = await rig.caller.expect(100)
    assert trying.call_id == "call-a" and trying.to_tag is None
    fwd = await rig.workers[1].expect("INVITE")
    vias = fwd.vias
    assert (vias[0].host, vias[0].port, vias[0].transport) == (HOST, rig.d.port, "UDP")
    assert vias[0].branch.startswith("z9hG4bK")
    assert vias[1].branch.startswith("z9hG4bKcaller")
    assert (vias[1].received, vias[1].rport) == (HOST, rig.caller.port)  # RFC 3581 on the caller's Via
    assert fwd.max_forwards == 69
    assert fwd.body == SDP.encode() and fwd.uri == f"sip:1000@{HOST}"
    await rig.workers[0].silent(0.1)
    await rig.workers[2].silent(0.05)
    assert rig.d.stats()["workers"][1]["pending"] == 1


async def test_200_ok_relayed_to_caller_with_our_via_removed(make_rig) -> None:
    rig = await make_rig(1)
    rig.invite("call-b")
    await rig.caller.expect(100)
    fwd = await rig.workers[0].expect("INVITE")
    rig.workers[0].answer(fwd, 100)  # the worker's own 100 is absorbed: we already said Trying
    rig.workers[0].answer(fwd, 180)
    ringing = await rig.caller.expect(180)
    assert len(ringing.vias) == 1 and ringing.top_via.branch == fwd.vias[1].branch
    rig.workers[0].answer(fwd, 200)
    ok = await rig.caller.expect(200)
    assert [v.branch for v in ok.vias] == [fwd.vias[1].branch]
    assert ok.get("Contact") == f"<sip:worker@{HOST}:{rig.workers[0].port}>"  # in-dialog requests go there
    assert ok.to_tag == "wtag" and ok.cseq == (1, "INVITE")
    rig.workers[0].answer(fwd, 200)  # a 2xx retransmission is relayed too (the caller re-ACKs)
    await rig.caller.expect(200)
    s = rig.d.stats()
    assert (s["invites"], s["forwarded"], s["relayed_responses"]) == (1, 1, 3)


async def test_486_from_worker_fails_over_to_the_next_worker(make_rig) -> None:
    rig = await make_rig(2)
    rig.d.set_load(1, 1)  # worker 0 is picked first
    rig.invite("call-c")
    await rig.caller.expect(100)
    first = await rig.workers[0].expect("INVITE")
    rig.workers[0].answer(first, 486, tag="busy0")
    ack = await rig.workers[0].expect("ACK")  # we ACK the 486 we do not relay
    assert ack.top_via.branch == first.top_via.branch and ack.to_tag == "busy0" and ack.cseq == (1, "ACK")
    second = await rig.workers[1].expect("INVITE")
    assert second.top_via.branch != first.top_via.branch and second.call_id == "call-c"
    rig.workers[1].answer(second, 200)
    assert (await rig.caller.expect(200)).to_tag == "wtag"  # the caller never saw the 486
    s = rig.d.stats()
    assert s["failovers"] == 1 and s["forwarded"] == 2
    assert [w["pending"] for w in s["workers"]] == [0, 1]


async def test_failure_with_no_other_worker_is_passed_on_and_its_ack_reaches_the_worker(make_rig) -> None:
    rig = await make_rig(1)
    rig.invite("call-d", branch="z9hG4bKcallerD")
    await rig.caller.expect(100)
    fwd = await rig.workers[0].expect("INVITE")
    rig.workers[0].answer(fwd, 486, tag="busy")
    busy = await rig.caller.expect(486)
    assert busy.to_tag == "busy"
    ack = request("ACK", rig.caller.port, call_id="call-d", branch="z9hG4bKcallerD", to_tag="busy")
    rig.caller.send(ack, rig.addr)
    got = await rig.workers[0].expect("ACK")  # same branch as the INVITE we sent: ends its transaction
    assert got.top_via.branch == fwd.top_via.branch
    assert rig.d.stats()["workers"][0]["pending"] == 0


async def test_failure_after_ringing_is_passed_on_without_failover(make_rig) -> None:
    """The worker rings as soon as it takes a call; a 486 after that is the bridge target's."""
    rig = await make_rig(2, router=Router({"1000": "sip:agent@127.0.0.1:5999"}))
    rig.invite("call-busy-target")
    await rig.caller.expect(100)
    fwd = await rig.workers[0].expect("INVITE")
    rig.workers[0].answer(fwd, 180, tag="t1")
    await rig.caller.expect(180)
    rig.workers[0].answer(fwd, 486, tag="t1")
    assert (await rig.caller.expect(486)).to_tag == "t1"
    await rig.workers[1].silent(0.1)
    assert rig.d.stats()["failovers"] == 0


async def test_all_workers_full_gets_503_with_retry_after(make_rig) -> None:
    rig = await make_rig(2)
    rig.d.set_load(0, 4)
    rig.d.set_load(1, 4)
    rig.invite("call-e")
    resp = await rig.caller.expect(503)
    assert resp.get("Retry-After") == "5" and "call slots are in use (8/8" in resp.get("Warning")
    ack = request("ACK", rig.caller.port, call_id="call-e", branch=resp.top_via.branch, to_tag=resp.to_tag)
    rig.caller.send(ack, rig.addr)  # the ACK of our own 503 stops here
    for w in rig.workers:
        await w.silent(0.1)
    assert rig.d.stats()["rejected"] == {503: 1}


async def test_no_live_worker_gets_503(make_rig) -> None:
    rig = await make_rig(1)
    rig.d.set_alive(0, False)
    rig.invite("call-e2")
    assert "no SIP worker is running" in (await rig.caller.expect(503)).get("Warning")


async def test_draining_gets_503(make_rig) -> None:
    rig = await make_rig(1)
    rig.d.draining = True
    rig.invite("call-f")
    resp = await rig.caller.expect(503)
    assert resp.get("Retry-After") == "30" and "shutting down" in resp.get("Warning")
    await rig.workers[0].silent(0.1)


async def test_invite_without_sdp_gets_488_with_warning(make_rig) -> None:
    rig = await make_rig(1)
    rig.invite("call-g", body="")
    resp = await rig.caller.expect(488)
    warning = resp.get("Warning")
    assert warning.startswith('399 callbridge "') and "SDP offer is required" in warning
    await rig.workers[0].silent(0.1)


async def test_offer_with_only_gsm_gets_488_listing_our_codecs(make_rig) -> None:
    rig = await make_rig(1)
    rig.invite("call-h", body=SDP_GSM)
    resp = await rig.caller.expect(488)
    warning = resp.get("Warning")
    assert "GSM/8000" in warning and "PCMU/8000, PCMA/8000, G722/16000" in warning
    await rig.workers[0].silent(0.1)


async def test_g722_offer_at_its_rtp_clock_of_8000_is_accepted(make_rig) -> None:
    rig = await make_rig(1)
    rig.invite("call-722", body=SDP_GSM.replace("RTP/AVP 3", "RTP/AVP 9"))
    await rig.caller.expect(100)
    await rig.workers[0].expect("INVITE")


async def test_garbage_does_not_crash_and_the_next_invite_works(make_rig) -> None:
    rig = await make_rig(1)
    for junk in (b"\x00\xff\xfe garbage", b"INVITE\r\n\r\n", b"SIP/2.0 200 OK\r\n\r\n", b"\r\n\r\n",
                 request("INVITE", rig.caller.port, call_id="x", body=SDP, omit=["Via"])):
        rig.caller.send(junk, rig.addr)
    await rig.caller.silent(0.2)  # nothing answerable: no Via to answer to
    rig.invite("call-i")
    await rig.caller.expect(100)
    await rig.workers[0].expect("INVITE")
    s = rig.d.stats()
    assert s["parse_errors"] == 3 and s["keepalives"] == 1 and s["internal_errors"] == 0
    assert s["stray_responses"] == 1


@pytest.mark.parametrize("omit, why", [("Call-ID", "missing Call-ID"), ("CSeq", "missing CSeq"),
                                       ("From", "missing From")])
async def test_malformed_invite_gets_400(make_rig, omit: str, why: str) -> None:
    rig = await make_rig(1)
    rig.caller.send(request("INVITE", rig.caller.port, call_id="call-j", body=SDP, omit=[omit]), rig.addr)
    resp = await rig.caller.expect(400)
    assert why in resp.get("Warning")
    await rig.workers[0].silent(0.1)
    assert rig.d.stats()["parse_errors"] == 1


async def test_bad_content_length_over_udp_gets_400(make_rig) -> None:
    rig = await make_rig(1)
    data = request("INVITE", rig.caller.port, call_id="call-cl", body=SDP).replace(
        f"Content-Length: {len(SDP)}".encode(), b"Content-Length: 9999")
    rig.caller.send(data, rig.addr)
    assert "exceeds" in (await rig.caller.expect(400)).get("Warning")


async def test_max_forwards_zero_gets_483(make_rig) -> None:
    rig = await make_rig(1)
    rig.caller.send(request("INVITE", rig.caller.port, call_id="mf", body=SDP).replace(
        b"Max-Forwards: 70", b"Max-Forwards: 0"), rig.addr)
    await rig.caller.expect(483)


async def test_options_gets_200_and_register_gets_405(make_rig) -> None:
    rig = await make_rig(1)
    rig.caller.send(request("OPTIONS", rig.caller.port, call_id="opt"), rig.addr)
    ok = await rig.caller.expect(200)
    assert ok.get("Allow") == ALLOW and ok.cseq == (1, "OPTIONS")
    rig.caller.send(request("REGISTER", rig.caller.port, call_id="reg"), rig.addr)
    nope = await rig.caller.expect(405)
    assert nope.get("Allow") == ALLOW
    rig.caller.send(request("FROBNICATE", rig.caller.port, call_id="frob"), rig.addr)
    await rig.caller.expect(501)
    await rig.workers[0].silent(0.1)


async def test_options_gets_503_while_draining_or_without_workers_so_a_front_door_takes_the_node_out(make_rig) -> None:
    """Kamailio's dispatcher probes nodes with OPTIONS: a node that refuses every INVITE says so
    there (503, Retry-After, the same Warning), and answers 200 again once it can take calls."""
    rig = await make_rig(2)
    rig.d.draining = True
    rig.caller.send(request("OPTIONS", rig.caller.port, call_id="opt-drain"), rig.addr)
    resp = await rig.caller.expect(503)
    assert resp.get("Retry-After") == "30" and "shutting down" in resp.get("Warning")
    rig.d.draining = False
    rig.d.set_alive(0, False)
    rig.caller.send(request("OPTIONS", rig.caller.port, call_id="opt-one"), rig.addr)
    await rig.caller.expect(200)  # one worker left: the node still takes calls
    rig.d.set_alive(1, False)
    rig.caller.send(request("OPTIONS", rig.caller.port, call_id="opt-none"), rig.addr)
    resp = await rig.caller.expect(503)
    assert resp.get("Retry-After") == "5" and "no SIP worker is running" in resp.get("Warning")
    rig.d.set_alive(1, True)
    rig.caller.send(request("OPTIONS", rig.caller.port, call_id="opt-back"), rig.addr)
    await rig.caller.expect(200)
    for w in rig.workers:
        await w.silent(0.1)


async def test_cancel_goes_to_the_invites_worker(make_rig) -> None:
    rig = await make_rig(2)
    rig.d.set_load(0, 3)  # worker 1 takes the call
    rig.invite("call-k", branch="z9hG4bKcallerK")
    await rig.caller.expect(100)
    fwd = await rig.workers[1].expect("INVITE")
    rig.workers[1].answer(fwd, 180)
    await rig.caller.expect(180)
    rig.caller.send(request("CANCEL", rig.caller.port, call_id="call-k", branch="z9hG4bKcallerK"), rig.addr)
    ok = await rig.caller.expect(200)
    assert ok.cseq == (1, "CANCEL")
    cancel = await rig.workers[1].expect("CANCEL")
    assert cancel.top_via.branch == fwd.top_via.branch and cancel.uri == fwd.uri and cancel.cseq == (1, "CANCEL")
    assert len(cancel.vias) == 1
    rig.workers[1].answer(cancel, 200)  # absorbed: the caller already has its 200
    rig.workers[1].answer(fwd, 487, tag="t487")
    terminated = await rig.caller.expect(487)  # cancelled: relayed, no failover
    assert terminated.to_tag == "t487"
    await rig.workers[0].silent(0.1)
    rig.caller.send(request("ACK", rig.caller.port, call_id="call-k", branch="z9hG4bKcallerK", to_tag="t487"),
                    rig.addr)
    assert (await rig.workers[1].expect("ACK")).top_via.branch == fwd.top_via.branch
    rig.caller.send(request("CANCEL", rig.caller.port, call_id="nope", branch="z9hG4bKnope"), rig.addr)
    await rig.caller.expect(481)


async def test_bye_with_known_call_id_is_forwarded_unknown_gets_481(make_rig) -> None:
    rig = await make_rig(2)
    rig.d.set_load(0, 1)
    rig.invite("call-l")
    await rig.caller.expect(100)
    fwd = await rig.workers[1].expect("INVITE")
    rig.workers[1].answer(fwd, 200)
    await rig.caller.expect(200)
    bye = request("BYE", rig.caller.port, call_id="call-l", cseq=2, to_tag="wtag", branch="z9hG4bKbye1")
    rig.caller.send(bye, rig.addr)
    got = await rig.workers[1].expect("BYE")
    assert got.vias[0].port == rig.d.port and got.vias[1].branch == "z9hG4bKbye1"
    rig.caller.send(bye, rig.addr)  # a retransmission goes to the same worker with the same branch
    again = await rig.workers[1].expect("BYE")
    assert again.top_via.branch == got.top_via.branch
    rig.workers[1].answer(got, 200)
    ok = await rig.caller.expect(200)
    assert ok.cseq == (2, "BYE") and [v.branch for v in ok.vias] == ["z9hG4bKbye1"]
    rig.caller.send(request("BYE", rig.caller.port, call_id="never-seen", cseq=2, to_tag="x"), rig.addr)
    await rig.caller.expect(481)
    await rig.workers[0].silent(0.1)


async def test_invite_retransmission_is_absorbed(make_rig) -> None:
    rig = await make_rig(2)
    data = rig.invite("call-m")
    await rig.caller.expect(100)
    await rig.workers[0].expect("INVITE")
    rig.caller.send(data, rig.addr)  # the caller did not hear our 100 in time
    await rig.caller.expect(100)
    for w in rig.workers:
        await w.silent(0.1)
    assert rig.d.stats()["forwarded"] == 1


async def test_silent_worker_is_retried_then_failed_over(make_rig) -> None:
    rig = await make_rig(2, t1=0.1, worker_timeout=0.35)
    rig.invite("call-n")
    await rig.caller.expect(100)
    first = await rig.workers[0].expect("INVITE")
    again = await rig.workers[0].expect("INVITE", timeout=1.0)  # Timer A retransmission
    assert again.top_via.branch == first.top_via.branch
    second = await rig.workers[1].expect("INVITE", timeout=2.0)
    assert second.top_via.branch != first.top_via.branch
    rig.workers[0].answer(first, 200, tag="late")  # the slow worker answers after all: hung up
    m = await rig.workers[0].recv()
    while m.method == "INVITE":  # the retransmissions sent before the timeout
        m = await rig.workers[0].recv()
    assert m.method == "ACK" and m.to_tag == "late"
    assert (await rig.workers[0].expect("BYE")).cseq == (2, "BYE")
    await rig.caller.silent(0.1)
    s = rig.d.stats()
    assert s["worker_timeouts"] == 1 and s["failovers"] == 1


async def test_dead_worker_fails_over_at_once(make_rig) -> None:
    rig = await make_rig(2)
    rig.invite("call-o")
    await rig.caller.expect(100)
    await rig.workers[0].expect("INVITE")
    rig.d.set_alive(0, False)
    await rig.workers[1].expect("INVITE", timeout=0.5)


async def test_load_accounting_for_bridged_calls(make_rig) -> None:
    rig = await make_rig(2, router=Router({"1000": "sip:agent@127.0.0.1:5999"}))
    rig.d.set_load(0, 2)
    rig.d.set_load(1, 3)
    rig.invite("bridged-1")  # needs 2 slots: only worker 0 has them
    await rig.caller.expect(100)
    fwd = await rig.workers[0].expect("INVITE")
    assert [w["pending"] for w in rig.d.stats()["workers"]] == [2, 0]
    rig.invite("bridged-2")  # worker 0 is full counting the pending call, worker 1 has 1 slot
    assert (await rig.caller.expect(503)).get("Retry-After")
    rig.invite("plain-1", user="2000")  # no route: 1 slot, fits worker 1
    await rig.caller.expect(100)
    await rig.workers[1].expect("INVITE")
    assert [(w["used"], w["pending"]) for w in rig.d.stats()["workers"]] == [(2, 2), (3, 1)]
    rig.workers[0].answer(fwd, 180, tag="b1")  # worker 0 took the call
    await rig.caller.expect(180)
    rig.d.set_load(0, 4)  # and its next report includes it
    assert rig.d.stats()["workers"][0]["pending"] == 0
    rig.workers[0].answer(fwd, 480)  # a failure frees nothing more than it counted
    await rig.caller.expect(480)
    assert rig.d.stats()["workers"][0]["pending"] == 0


async def test_bad_target_header_gets_400(make_rig) -> None:
    rig = await make_rig(1, router=Router({}, allow_target_header=True))
    rig.invite("call-p", extra=["X-Callbridge-Target: http://evil.example.com"])
    resp = await rig.caller.expect(400)
    assert resp.reason == "Bad Bridge Target" and "X-Callbridge-Target" in resp.get("Warning")
    rig.invite("call-q", extra=["X-Callbridge-Target: <sip:agent@127.0.0.1:5999>"])
    await rig.caller.expect(100)
    await rig.workers[0].expect("INVITE")
    assert rig.d.stats()["workers"][0]["pending"] == 2


async def _tcp_read(reader: asyncio.StreamReader, parser: StreamParser, timeout: float = 2.0) -> SipMessage:
    async def go() -> SipMessage:
        while True:
            m = parser.pop()
            if m is not None:
                return m
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed")
            parser.feed(data)
    return await asyncio.wait_for(go(), timeout)


async def test_tcp_caller_gets_responses_on_its_connection(make_rig) -> None:
    rig = await make_rig(1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, rig.d.port), 2.0)
    try:
        local_port = writer.get_extra_info("sockname")[1]
        parser = StreamParser()
        data = request("INVITE", local_port, call_id="tcp-1", body=SDP, transport="TCP")
        writer.write(b"\r\n\r\n" + data[:50])  # a keep-alive ping, then the INVITE in two pieces
        await writer.drain()
        pong = await asyncio.wait_for(reader.readexactly(2), 2.0)
        assert pong == b"\r\n"
        writer.write(data[50:] + request("OPTIONS", local_port, call_id="tcp-2", transport="TCP"))
        first = await _tcp_read(reader, parser)
        second = await _tcp_read(reader, parser)
        assert sorted([(first.status, first.call_id), (second.status, second.call_id)]) == [
            (100, "tcp-1"), (200, "tcp-2")]
        fwd = await rig.workers[0].expect("INVITE")  # forwarded to the worker over UDP
        assert fwd.top_via.transport == "UDP" and fwd.vias[1].transport == "TCP"
        rig.workers[0].answer(fwd, 200)
        ok = await _tcp_read(reader, parser)
        assert ok.status == 200 and ok.call_id == "tcp-1" and ok.vias[0].transport == "TCP"
        await rig.caller.silent(0.05)
    finally:
        writer.close()


async def test_tcp_bad_content_length_gets_400_and_close(make_rig) -> None:
    rig = await make_rig(1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, rig.d.port), 2.0)
    try:
        port = writer.get_extra_info("sockname")[1]
        writer.write(request("INVITE", port, call_id="tcp-bad", body=SDP, transport="TCP").replace(
            f"Content-Length: {len(SDP)}".encode(), b"Content-Length: -1"))
        parser = StreamParser()
        resp = await _tcp_read(reader, parser)
        assert resp.status == 400 and "Content-Length" in resp.get("Warning")
        assert await asyncio.wait_for(reader.read(), 2.0) == b""  # closed
    finally:
        writer.close()
    rig.invite("after-bad-tcp")  # the dispatcher carries on
    await rig.caller.expect(100)


async def test_stats_and_stop_leave_nothing_behind(make_rig) -> None:
    rig = await make_rig(1)
    rig.invite("call-r")
    await rig.caller.expect(100)
    await rig.workers[0].expect("INVITE")
    s = rig.d.stats()
    assert s["transactions"] == 1 and s["invites_open"] == 1 and s["dialogs"] == 1
    rig.d.sweep(now=10**9)  # far in the future: everything expired
    s = rig.d.stats()
    assert (s["transactions"], s["invites_open"], s["dialogs"]) == (0, 0, 0)
    assert s["workers"][0]["pending"] == 0
    await rig.d.stop()
    await rig.d.stop()  # idempotent


async def _held(port: int, source: str = HOST) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection from `source` that the dispatcher serves (an OPTIONS on it gets 200)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port, local_addr=(source, 0)), 2.0)
    local = writer.get_extra_info("sockname")[1]
    writer.write(request("OPTIONS", local, call_id=f"opt-{source}-{local}", transport="TCP"))
    resp = await _tcp_read(reader, StreamParser())
    assert resp.status == 200
    return reader, writer


async def _closed_at_once(port: int, source: str = HOST) -> None:
    """A connection from `source` that the dispatcher closes without reading a byte of it."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port, local_addr=(source, 0)), 2.0)
    try:
        try:
            got = await asyncio.wait_for(reader.read(), 2.0)
        except ConnectionResetError:
            got = b""
        assert got == b""
    finally:
        writer.close()


async def test_tcp_connections_capped_in_total_and_per_source(make_rig) -> None:
    rig = await make_rig(1, tcp_limits=TcpLimits(max_connections=3, max_connections_per_source=2))
    port = rig.d.port
    held = [await _held(port), await _held(port)]
    await _closed_at_once(port)  # a third from 127.0.0.1
    held.append(await _held(port, "127.0.0.2"))  # another source still gets one
    await _closed_at_once(port, "127.0.0.3")  # but the total is reached
    s = rig.d.stats()
    assert s["tcp_connections"] == 3 and s["tcp_refused"] == 2
    held.pop()[1].close()
    while rig.d.stats()["tcp_connections"] > 2:  # the dispatcher sees the close
        await asyncio.sleep(0.01)
    held.append(await _held(port, "127.0.0.3"))  # room again
    for _, w in held:
        w.close()


async def test_tcp_oversized_messages_refused_and_closed(make_rig) -> None:
    rig = await make_rig(1, tcp_limits=TcpLimits(max_message_bytes=2048))
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, rig.d.port), 2.0)
    try:  # a body over the limit: its headers are answered 413, then the connection closes
        port = writer.get_extra_info("sockname")[1]
        big = "a=x-pad:" + "p" * 4000 + "\r\n"
        writer.write(request("INVITE", port, call_id="tcp-big", body=SDP + big, transport="TCP"))
        resp = await _tcp_read(reader, StreamParser())
        assert resp.status == 413 and "2048" in resp.get("Warning")
        assert await asyncio.wait_for(reader.read(), 2.0) == b""
    finally:
        writer.close()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, rig.d.port), 2.0)
    try:  # a header section that never ends within the limit: closed (no headers to answer)
        writer.write(b"INVITE sip:1000@127.0.0.1 SIP/2.0\r\nX-Pad: " + b"p" * 4000)
        assert await asyncio.wait_for(reader.read(), 2.0) == b""
    finally:
        writer.close()
    await rig.workers[0].silent(0.05)  # nothing reached the worker
    assert rig.d.stats()["rejected"] == {413: 1}
    reader, writer = await _held(rig.d.port)  # and the dispatcher carries on
    writer.close()


async def test_tcp_trickling_message_closed_after_message_timeout(make_rig) -> None:
    """Slowloris: a message sent a byte at a time is cut off `message_timeout_s` after its first
    byte although bytes keep coming; an idle connection (no message started) is left open."""
    rig = await make_rig(1, tcp_limits=TcpLimits(message_timeout_s=0.5))
    idle = await _held(rig.d.port)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, rig.d.port), 2.0)
    port = writer.get_extra_info("sockname")[1]
    data = request("INVITE", port, call_id="slow", body=SDP, transport="TCP")

    async def trickle() -> None:
        for b in data:
            writer.write(bytes([b]))
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    try:
        try:
            got = await asyncio.wait_for(reader.read(), 10.0)
        except ConnectionResetError:
            got = b""
        assert got == b"" and not sender.done()  # closed while bytes were still coming
    finally:
        sender.cancel()
        writer.close()
    assert rig.d.stats()["tcp_slow_messages"] == 1
    await rig.workers[0].silent(0.05)
    assert rig.d.stats()["tcp_connections"] == 1  # the idle one is still open
    idle[1].write(request("OPTIONS", idle[1].get_extra_info("sockname")[1], call_id="still", transport="TCP"))
    assert (await _tcp_read(idle[0], StreamParser())).status == 200
    idle[1].close()


async def test_a_load_report_keeps_counting_invites_the_worker_has_not_answered(make_rig) -> None:
    """A report can be older than INVITEs already on their way to the worker: those stay counted
    until the worker answers them, so a burst is refused here (503) rather than sent to a worker
    that is full (486). Answered ones are the report's."""
    rig = await make_rig(1, capacity=2)
    fwd = []
    for cid in ("burst-a", "burst-b"):
        rig.invite(cid)
        await rig.caller.expect(100)
        fwd.append(await rig.workers[0].expect("INVITE"))
    rig.d.set_load(0, 0)  # written before the worker saw either INVITE
    rig.invite("burst-c")
    assert (await rig.caller.expect(503)).get("Retry-After")
    await rig.workers[0].silent(0.05)
    rig.workers[0].answer(fwd[0], 180, tag="a")  # the worker took burst-a
    await rig.caller.expect(180)
    rig.d.set_load(0, 1)
    assert [(w["used"], w["pending"]) for w in rig.d.stats()["workers"]] == [(1, 1)]
    rig.workers[0].answer(fwd[1], 486, tag="b")  # and refused burst-b: nothing pending any more
    await rig.caller.expect(486)
    assert [(w["used"], w["pending"]) for w in rig.d.stats()["workers"]] == [(1, 0)]


async def test_cancel_while_the_admission_check_is_awaited_ends_the_invite_487_and_gives_back_the_hold(make_rig) -> None:
    """The service's check (credits in the key store) is awaited after 100 Trying: a CANCEL in that
    time is answered 200, and once the check is back the INVITE ends 487 without reaching a worker,
    its hold given back; retransmissions meanwhile are absorbed."""
    checked, go = asyncio.Event(), asyncio.Event()
    released: list[str] = []

    class Held:
        def release(self) -> None:
            released.append("hold")

    async def admission(needed: int, msg) -> Held:
        checked.set()
        await go.wait()
        return Held()

    rig = await make_rig(1, admission=admission)
    data = rig.invite("slow-1", branch="z9hG4bKslow1")
    await rig.caller.expect(100)
    await asyncio.wait_for(checked.wait(), 5)
    rig.caller.send(data, rig.addr)  # a retransmission while the check runs: the 100 again, nothing new
    await rig.caller.expect(100)
    rig.caller.send(request("CANCEL", rig.caller.port, call_id="slow-1", branch="z9hG4bKslow1"), rig.addr)
    assert (await rig.caller.expect(200)).cseq[1] == "CANCEL"
    go.set()
    resp = await rig.caller.expect_final(487)
    assert resp.call_id == "slow-1"
    await rig.workers[0].silent(0.3)  # the worker never saw it
    assert released == ["hold"]
