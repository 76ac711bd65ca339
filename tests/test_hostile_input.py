"""Hostile input against the real service: every variant is refused with a typed error and a JSON
body (401 / 400 / an INVALID_CONFIG frame), logged in one line, and never reaches a 500 or a
traceback. Classes: JWT headers of odd types, credentials that are not ASCII, JSON nested past the
recursion limit or holding numbers JSON cannot carry (every JSON REST body, `start` and control
frames), and speaker labels or segment text with line breaks and control characters, which must
not be able to add cues to the SRT/VTT/TXT exports even when already stored.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import re
from typing import Any

import aiohttp
import numpy as np
import pytest
import structlog

from bridge.client.webrtc import WebRtcClient
from bridge.jobs import export
from bridge.jobs.model import Job, Segment
from bridge.logs import configure_logging
from tests.serving import API_KEY, start_server
from tests.test_api_jobs import auth, final, make_job, owner_of
from tests.test_export import parse_srt, parse_vtt

HS_SECRET = "hostile-hs256-secret-0123456789abcdef0123456789"

DEEP = "[" * 100_000 + "]" * 100_000  # past the interpreter's recursion limit: RecursionError in json.loads
DEEP_OBJECT = '{"a": ' * 40 + "1" + "}" * 40  # under the recursion limit, over the loader's depth limit
BAD_JSON: dict[str, str | bytes] = {
    "deep_array": DEEP,
    "deep_in_object": '{"type": "start", "metadata": {"x": ' + DEEP + "}}",
    "deep_object": DEEP_OBJECT,
    "nan": '{"type": "start", "max_duration_seconds": NaN, "expires_in": NaN}',
    "infinity": '{"type": "start", "max_duration_seconds": 1e999, "expires_in": 1e999}',
    "huge_int": '{"type": "start", "endpointing_ms": ' + "9" * 5000 + ', "expires_in": ' + "9" * 5000 + "}",
    "not_utf8": b'{"type": "start", "language": "\xff\xfe"}',
}
TEXT_FRAMES = {k: v for k, v in BAD_JSON.items() if isinstance(v, str)}

INJECTION = "agent\n\n99\n00:00:00,000 --> 00:09:00,000\nINJECTED CUE"
BAD_LABELS = {
    "cue_injection": INJECTION,
    "long": "x" * 5000,
    "escape": "\x1b[2Jclear",
    "nul": "a\x00b",
    "tab": "a\tb",
    "line_separator": "a\u2028b",
    "bidi_override": "\u202eevil",
    "c1_next_line": "a\x85b",
}

REFUSAL_EVENTS = {"request_refused", "auth_refused", "auth_backoff", "session_refused", "webrtc_offer_refused"}


class Log:
    """The service's log lines (JSON), as a deployment would collect them."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def mark(self) -> int:
        return len(self.stream.getvalue())

    def lines(self, since: int = 0) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue()[since:].splitlines() if line.strip()]

    def assert_no_traceback(self) -> None:
        text = self.stream.getvalue()
        assert "Traceback" not in text, text[-3000:]
        for line in self.lines():
            assert "exception" not in line and line["level"] not in ("error", "critical"), line

    def refusals(self, since: int) -> list[dict[str, Any]]:
        """Our refusal lines since `since` (the access log and the like are not ours)."""
        return [x for x in self.lines(since) if x["event"] in REFUSAL_EVENTS]


@pytest.fixture
def log():
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    yield Log(stream)
    structlog.contextvars.clear_contextvars()
    for h in [h for h in root.handlers if getattr(h, "_callbridge_handler", False)]:
        root.removeHandler(h)
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.fixture
async def srv(tmp_path, pool, log):
    """The real service accepting HS256 JWTs; authentication backoff off (these tests send many
    refused credentials on purpose; the backoff has its own tests in test_auth.py); key-owned
    webhooks may point at loopback (a registered endpoint must not leave this machine)."""
    s = await start_server(tmp_path / "data", pool, **{"auth.jwt_hs256_secret": HS_SECRET,
                                                       "auth.failures_before_backoff": "0",
                                                       "webhooks.allow_private_targets": "true"})
    yield s
    await s.stop()
    log.assert_no_traceback()


async def _json_refusal(log: Log, resp: aiohttp.ClientResponse, status: int, code: str, since: int) -> dict:
    assert resp.status == status, (resp.status, await resp.text())
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"]["code"] == code and body["error"]["message"], body
    assert len(body["error"]["message"]) < 400, body  # the hostile value is not echoed back whole
    lines = log.refusals(since)
    assert len(lines) == 1, lines
    log.assert_no_traceback()
    return body


# --------------------------------------------------------------------------- JWT headers


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _signed(header: Any, raw_header: str | None = None) -> str:
    """An HS256 JWT with this header, correctly signed, so only the header can be what is wrong."""
    head = _b64((raw_header if raw_header is not None else json.dumps(header)).encode())
    body = _b64(json.dumps({"sub": "mallory", "aud": "callbridge", "exp": 4102444800}).encode())
    sig = hmac.new(HS_SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


ODD_HEADERS: dict[str, str] = {
    **{f"kid_{name}": _signed({"alg": "HS256", "kid": v}) for name, v in
       [("int", 1), ("list", [1]), ("dict", {"a": 1}), ("null", None), ("float", 1.5), ("bool", True)]},
    **{f"crit_{name}": _signed({"alg": "HS256", "crit": v}) for name, v in
       [("int", 1), ("unknown", ["x-custom"]), ("dict", {}), ("null", None), ("empty", []), ("nested", [["b64"]])]},
    **{f"alg_{name}": _signed({"alg": v}) for name, v in
       [("list", ["HS256"]), ("dict", {"HS256": 1}), ("null", None), ("int", 256), ("long", "H" * 5000)]},
    "b64_false": _signed({"alg": "HS256", "b64": False, "crit": ["b64"]}),
    "header_list": _signed(None, "[1, 2]"),
    "header_string": _signed(None, '"HS256"'),
    # 2000 levels: past the recursion limit, and still inside aiohttp's 8190-byte header line
    "header_deep": _signed(None, '{"alg": "HS256", "x": ' + "[" * 2000 + "]" * 2000 + "}"),
    "header_huge_int": _signed(None, '{"alg": "HS256", "x": ' + "9" * 5000 + "}"),
    "header_not_utf8": ".".join(map(_b64, (b'{"alg": "\xff"}', b"{}", b"x"))),
    "header_not_utf8_raw": ".".join(map(_b64, (bytes([0xFF, 0xFE]), b"{}", b"x"))),
    "payload_deep": ".".join(map(_b64, (b'{"alg": "HS256"}', b"[" * 2000 + b"]" * 2000, b"x"))),
}


async def test_odd_jwt_headers_are_401_on_rest_and_socket(srv: Any, log: Log) -> None:
    async with aiohttp.ClientSession() as s:
        for name, token in ODD_HEADERS.items():
            mark = log.mark()
            async with s.get(f"{srv.url}/v1/jobs", headers={"Authorization": f"Bearer {token}"}) as r:
                body = await _json_refusal(log, r, 401, "INVALID_CREDENTIALS", mark)
            assert token not in body["error"]["message"], name
            mark = log.mark()
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                async with s.ws_connect(srv.ws_url, params={"token": token}):
                    pass
            assert e.value.status == 401, name
            assert len(log.refusals(mark)) == 1, name
    assert (await srv.service.store.list_jobs(limit=10))[0] == []


async def _raw(port: int, path: str, header_bytes: bytes) -> tuple[int, bytes]:
    """A GET with header bytes no well-behaved client would send (aiohttp's client refuses to)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + header_bytes + b"\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def _raw_get(port: int, path: str, header_bytes: bytes) -> tuple[int, dict]:
    status, body = await _raw(port, path, header_bytes)
    return status, json.loads(body)


async def test_credentials_that_are_not_printable_ascii_are_401(srv: Any, log: Log) -> None:
    for header in (b"Authorization: Bearer cbk_\xff\xfe_not_utf8_at_all_0000",
                   "Authorization: Bearer cbk_caf\u00e9_0123456789abcdef".encode(),
                   b"Authorization: Bearer " + b"k" * 8000):
        mark = log.mark()
        status, body = await _raw_get(srv.port, "/v1/jobs", header)
        assert status == 401 and body["error"]["code"] == "INVALID_CREDENTIALS", (header[:60], body)
        assert len(log.refusals(mark)) == 1
    mark = log.mark()
    for query in ("api_key=%FF%FE%00abcdefghijklmnop", "api_key=cbk_with%01control_0123456789",
                  "token=cbt_%E2%80%AEevil_0123456789"):
        mark = log.mark()
        status, body = await _raw_get(srv.port, "/v1/jobs?" + query, b"X-Any: 1")
        assert status == 401 and body["error"]["code"] == "INVALID_CREDENTIALS", (query, body)
        assert len(log.refusals(mark)) == 1
    log.assert_no_traceback()


async def test_a_request_aiohttp_cannot_parse_logs_one_line_without_traceback(srv: Any, log: Log) -> None:
    """A header line over aiohttp's 8190-byte limit (e.g. a JWT padded with nesting) is refused by
    the HTTP parser before any handler runs: 400, and one log line, not a traceback."""
    for header in (b"Authorization: Bearer " + b"e" * 9000, b"Authorization: Bearer cbk_with\x01control_0123"):
        mark = log.mark()
        status, _ = await _raw(srv.port, "/v1/jobs", header)
        assert status == 400
        lines = [x for x in log.lines(mark) if x["logger"] == "aiohttp.server"]
        assert len(lines) == 1 and "malformed request" in lines[0]["event"], lines
    log.assert_no_traceback()


# --------------------------------------------------------------------------- JSON REST bodies


async def _targets(srv: Any, s: aiohttp.ClientSession) -> list[tuple[str, str, int, str]]:
    """Every route that reads a JSON body: (method, url, status, code) of its refusal."""
    job = await make_job(srv, await owner_of(srv))
    async with s.post(f"{srv.url}/v1/webhooks", headers=auth(),
                      json={"url": "http://127.0.0.1:9/callbridge", "secret": "s" * 24}) as r:
        assert r.status == 201, await r.text()
        wid = (await r.json())["id"]
    return [("POST", f"{srv.url}/v1/tokens", 400, "INVALID_REQUEST"),
            ("PATCH", f"{srv.url}/v1/jobs/{job.id}", 400, "INVALID_REQUEST"),
            ("POST", f"{srv.url}/v1/webhooks", 400, "INVALID_REQUEST"),
            ("PATCH", f"{srv.url}/v1/webhooks/{wid}", 400, "INVALID_REQUEST"),
            ("POST", f"{srv.url}/v1/webrtc/offer", 400, "INVALID_CONFIG")]


async def test_hostile_json_in_every_rest_body(srv: Any, log: Log) -> None:
    async with aiohttp.ClientSession() as s:
        for method, url, status, code in await _targets(srv, s):
            for name, body in BAD_JSON.items():
                mark = log.mark()
                async with s.request(method, url, data=body if isinstance(body, bytes) else body.encode(),
                                     headers={**auth(), "Content-Type": "application/json"}) as r:
                    await _json_refusal(log, r, status, code, mark)
        # nothing was changed by any of them
        assert len((await (await s.get(f"{srv.url}/v1/webhooks", headers=auth())).json())["webhooks"]) == 1


# --------------------------------------------------------------------------- start and control frames


async def _refused_start(srv: Any, s: aiohttp.ClientSession, frame: str) -> dict:
    async with s.ws_connect(srv.ws_url, params={"api_key": API_KEY}) as ws:
        await ws.send_str(frame)
        err = await ws.receive_json(timeout=15)
        closing = await ws.receive(timeout=15)
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4400, closing
    return err


async def test_hostile_start_frames_are_invalid_config(srv: Any, log: Log) -> None:
    async with aiohttp.ClientSession() as s:
        for name, frame in TEXT_FRAMES.items():
            mark = log.mark()
            err = await _refused_start(srv, s, frame)
            assert err["type"] == "error" and err["code"] == "INVALID_CONFIG", (name, err)
            assert len(err["message"]) < 400
            assert [x["event"] for x in log.refusals(mark)] == ["session_refused"], name
    assert (await srv.service.store.list_jobs(limit=10))[0] == []
    log.assert_no_traceback()


async def test_hostile_control_frames_end_the_session_with_invalid_config(srv: Any, log: Log) -> None:
    async with aiohttp.ClientSession() as s:
        for name, frame in TEXT_FRAMES.items():
            async with s.ws_connect(srv.ws_url, params={"api_key": API_KEY}) as ws:
                await ws.send_json({"type": "start"})
                ready = await ws.receive_json(timeout=15)
                assert ready["type"] == "ready"
                await ws.send_bytes(b"\x00\x00" * 1600)
                await ws.send_str(frame)
                frames = [json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT]
                assert ws.close_code == 4400, (name, ws.close_code)
            err = frames[-1]
            assert err["type"] == "error" and err["code"] == "INVALID_CONFIG", (name, err)
            job = await srv.service.store.get_job(ready["job_id"])
            assert job.status.value == "failed" and job.error["code"] == "INVALID_CONFIG"
    log.assert_no_traceback()


async def test_hostile_json_on_the_webrtc_events_channel_ends_the_call_with_invalid_config(srv: Any, log: Log) -> None:
    """The data channel takes the same control messages as the socket, through the same loader."""
    for name, frame in [("deep_array", "[" * 5000 + "]" * 5000), ("huge_int", TEXT_FRAMES["huge_int"]),
                        ("nan", '{"type": "configure", "endpointing_ms": NaN}')]:
        async with WebRtcClient(srv.url, api_key=API_KEY, audio=np.zeros(16000, np.int16)) as c:
            c.channel.send(frame)
            events = [e async for e in c]
        assert events[-1]["type"] == "error" and events[-1]["code"] == "INVALID_CONFIG", (name, events[-1:])
        job = await srv.service.store.get_job(c.job_id)  # saved before the error was sent
        assert job.status.value == "failed" and job.error["code"] == "INVALID_CONFIG", (name, job)
    log.assert_no_traceback()


# --------------------------------------------------------------------------- speaker labels and text


async def test_oversized_start_values_are_refused_in_a_short_message(srv: Any, log: Log) -> None:
    """A refusal quotes the value it refuses, cut short: a 100 kB field is not echoed (or logged) whole."""
    async with aiohttp.ClientSession() as s:
        for frame in ({"type": "start", "encoding": "e" * 100_000}, {"type": "start", "sample_rate": 10 ** 4000},
                      {"type": "start", "language": "x" * 100_000}, {"type": "start", "channels": "2" * 100_000},
                      {"type": "start", "word_boost": ["a\nb"]}, {"type": "start", "word_boost": ["\x00"]},
                      {"type": "st" * 50_000}):
            mark = log.mark()
            err = await _refused_start(srv, s, json.dumps(frame))
            assert err["code"] == "INVALID_CONFIG" and len(err["message"]) < 400, err["message"][:500]
            (line,) = log.refusals(mark)
            assert len(json.dumps(line)) < 1000
    log.assert_no_traceback()


async def test_bad_speaker_labels_are_refused_at_start(srv: Any, log: Log) -> None:
    async with aiohttp.ClientSession() as s:
        for name, label in BAD_LABELS.items():
            mark = log.mark()
            err = await _refused_start(srv, s, json.dumps({"type": "start", "channels": 2,
                                                           "metadata": {"speakers": ["caller", label]}}))
            assert err["code"] == "INVALID_CONFIG" and "metadata.speakers[1]" in err["message"], (name, err)
            assert len(err["message"]) < 400 and len(log.refusals(mark)) == 1
            # the WebRTC offer takes the same start fields
            mark = log.mark()
            offer = {"sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "type": "offer",
                     "config": {"metadata": {"speakers": [label]}}}
            async with s.post(f"{srv.url}/v1/webrtc/offer", json=offer, headers=auth()) as r:
                body = await _json_refusal(log, r, 400, "INVALID_CONFIG", mark)
            assert "metadata.speakers[0]" in body["error"]["message"], (name, body)
        # a fine label still works, as given (trimmed)
        async with s.ws_connect(srv.ws_url, params={"api_key": API_KEY}) as ws:
            await ws.send_json({"type": "start", "channels": 2, "metadata": {"speakers": ["Dr. Müller", " agent 7 "]}})
            ready = await ws.receive_json(timeout=15)
            assert ready["config"]["speakers"] == ["Dr. Müller", "agent 7"], ready
            await ws.send_json({"type": "end"})
    assert [j.status.value for j in (await srv.service.store.list_jobs(limit=10))[0]] == ["completed"]


async def test_patch_refuses_control_characters_and_changes_nothing(srv: Any, log: Log) -> None:
    job = await make_job(srv, await owner_of(srv))
    seg_id = (await srv.service.store.segments(job.id))[0].id
    url = f"{srv.url}/v1/jobs/{job.id}"
    edits = [{"segments": [{"id": seg_id, "text": t}]} for t in
             ("a\x00b", "line one\nline two", "a\rb", "a\u2029b", "\x1b[31mred", "\u202egnirts", "x" * 10001)]
    edits += [{"segments": [{"id": seg_id, "speaker": label}]} for label in BAD_LABELS.values()]
    edits += [{"speakers": {"caller": label}} for label in BAD_LABELS.values()]
    edits += [{"speakers": {"x" * 5000: "y"}}, {"segments": [{"id": seg_id, "text": "ok", "z" * 5000: 1}]}]
    async with aiohttp.ClientSession() as s:
        before = await (await s.get(url, headers=auth())).json()
        for edit in edits:
            mark = log.mark()
            async with s.patch(url, json=edit, headers=auth()) as r:
                await _json_refusal(log, r, 400, "INVALID_REQUEST", mark)
        assert await (await s.get(url, headers=auth())).json() == before
        # a clean edit still goes through
        async with s.patch(url, json={"segments": [{"id": seg_id, "text": "Hello there, ça va?"}],
                                      "speakers": {"agent": "Agent Smith"}}, headers=auth()) as r:
            assert r.status == 200, await r.text()


# --------------------------------------------------------------------------- exporters, defensively

TIMING = re.compile(r"\d\d:\d\d:\d\d[,.]\d{3} --> ")


def _hostile_job() -> tuple[Job, list[Segment]]:
    """A job as a store written before the input checks could hold it."""
    job = Job(id="job_X", owner="key_x", speakers=["caller", INJECTION])
    segs = [Segment(id=1, job_id=job.id, seq=1, channel=1, speaker=INJECTION, start=1.0, end=3.0,
                    text="fine words 00:00:05,000 --> 00:00:09,000 more\x00words \u2028and\x1b[2J"),
            Segment(id=2, job_id=job.id, seq=2, channel=0, speaker="caller\u2029\u2029", start=4.0, end=5.0,
                    text="second\n\n3\n00:00:07,000 --> 00:00:08,000\nINJECTED TOO")]
    return job, segs


def test_exporters_keep_every_stored_value_inside_its_cue() -> None:
    job, segs = _hostile_job()
    srt = export.to_srt(job, segs)
    cues = parse_srt(srt)  # numbered 1..n, each with one timing line: nothing injected a cue
    assert [c[0] for c in cues] == sorted(c[0] for c in cues) and cues[0][0] == 1.0 and cues[-1][1] == 5.0
    assert all(not TIMING.search(line) and "-->" not in line for c in cues for line in c[2])
    vtt = export.to_vtt(job, segs)
    vcues = parse_vtt(vtt)  # each block one timing line and a voice tag: nothing injected a cue
    assert [c[0] for c in vcues] == sorted(c[0] for c in vcues) and vcues[0][0] == 1.0 and vcues[-1][1] == 5.0
    assert all(TIMING.match(line) for line in vtt.splitlines() if "-->" in line)  # "-->" only in timing lines
    spoken = [w for seg in segs for w in " ".join(seg.text.split()).replace("\x00", " ").replace("\x1b", " ").split()]
    assert [w for c in vcues for line in c[3] for w in line.split()] == spoken  # every word kept, in order
    assert [c[2] for c in vcues][0].startswith("agent 99") and all("\n" not in c[2] for c in vcues)
    txt = export.to_txt(job, segs)
    assert len(txt.splitlines()) == len(segs)
    for out in (srt, vtt, txt):
        assert not any(c in out for c in "\x00\x1b\r\u2028\u2029\u202e")


async def test_exports_over_http_stay_well_formed_with_a_stored_bad_label(srv: Any) -> None:
    bad = [final("fine words --> more", 1.0, 3.0, 1, INJECTION),
           final("second words", 4.0, 5.0, 0, "caller\u2028x")]
    job = await make_job(srv, await owner_of(srv), finals=bad, audio=False)
    async with aiohttp.ClientSession() as s:
        got = {}
        for fmt in ("srt", "vtt", "txt"):
            async with s.get(f"{srv.url}/v1/jobs/{job.id}/transcript", params={"format": fmt}, headers=auth()) as r:
                assert r.status == 200
                got[fmt] = await r.text()
    assert len(parse_srt(got["srt"])) == len(parse_vtt(got["vtt"])) == 2
    assert len(got["txt"].splitlines()) == 2 and "INJECTED CUE" in got["txt"].splitlines()[0]
