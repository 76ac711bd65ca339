"""SIP calls end to end: the service with its dispatcher and pjsua2 workers, callers and callees
in separate processes (pjsua2 via sip.peer, and Debian's baresip), the real model, the real store."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import signal
import sys
import time
import uuid
import wave
from pathlib import Path

import numpy as np
import pytest

from bench import corpus
from bench.calls import speech_bounds
from sip.message import SipMessage, make_response, name_addr_uri, new_branch, parse_message
from sip.ports import free_sip_port
from tests.serving import start_server
from tests.test_sip_worker import finish_peer, start_peer

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
CALLER = "Let me transfer you to the billing department, one moment please."
AGENT = "I need to cancel my subscription before the next billing cycle."


def speech_wav(path: Path, text: str, rate: int = 8000, lead: float = 0.5, tail: float = 1.0) -> Path:
    s = corpus.synthesize(text, rate=140)
    a, b = speech_bounds(s)
    pcm = np.concatenate([np.zeros(int(lead * SR), np.int16), s[a:b], np.zeros(int(tail * SR), np.int16)])
    if rate != SR:
        pcm = corpus._resample(pcm, SR, rate)
    corpus.write_wav(path, pcm, rate)
    return path


async def peer(*args: str, timeout: float = 60) -> tuple[int, dict | None, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sip.peer", *args, cwd=str(ROOT),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    lines = [x for x in out.decode().splitlines() if x.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else None), err.decode()


async def wait_job_done(store, timeout: float = 30.0, n: int = 1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        jobs, _ = await store.list_jobs()
        done = [j for j in jobs if j.status.value != "live"]
        if len(done) >= n:
            return done
        await asyncio.sleep(0.1)
    raise AssertionError(f"no finished SIP job in {timeout} s: {(await store.list_jobs())[0]}")


async def leg_text(store, job_id: str, speaker: str) -> str:
    return " ".join(g.text for g in await store.segments(job_id) if g.speaker == speaker and g.text)


@pytest.fixture
async def sip_server(tmp_path, pool):
    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                         "sip.workers": "2"})
    yield srv
    await srv.stop()


async def test_pjsua2_caller_transcribed_and_bye_completes(sip_server, tmp_path):
    svc = sip_server.service
    wav = speech_wav(tmp_path / "caller.wav", CALLER)
    rc, info, err = await peer("call", f"sip:support@127.0.0.1:{svc.sip.port}", "--play", str(wav),
                               "--header", "X-Ticket: 4711")
    assert rc == 0, err
    assert info["sip_code"] == 200 and info["hangup_by"] == "us" and info["codec"].startswith("PCMU")
    job = (await wait_job_done(svc.store))[0]
    assert job.source.value == "sip" and job.status.value == "completed" and job.speakers == ["caller"]
    assert job.metadata["ended_by"] == "bye_caller"
    sip = job.metadata["sip"]
    assert sip["call_id"] == info["call_id"] and "X-Ticket" in sip["headers"] and "support@" in sip["to"]
    text = await leg_text(svc.store, job.id, "caller")
    assert corpus.wer(CALLER, text) <= 0.15, text
    with wave.open(job.audio_path) as w:
        assert w.getnchannels() == 1 and abs(w.getnframes() / SR - info["sent_seconds"]) < 1.0


@pytest.mark.skipif(shutil.which("baresip") is None, reason="Debian baresip not installed")
async def test_baresip_caller(sip_server, tmp_path):
    svc = sip_server.service
    wav = speech_wav(tmp_path / "caller.wav", CALLER)
    conf = tmp_path / "baresip"
    conf.mkdir()
    port = free_sip_port(span=41)  # SIP port, then its RTP ports just above
    (conf / "config").write_text(
        f"sip_listen 127.0.0.1:{port}\nnet_interface 127.0.0.1\naudio_source aufile,{wav}\n"
        "audio_player aubridge,nil\naudio_alert aubridge,nil\naudio_srate 8000\naudio_channels 1\n"
        f"rtp_ports {port + 2}-{port + 40}\nmodule_path /usr/lib/baresip/modules\n"
        "module stdio.so\nmodule g711.so\nmodule aufile.so\nmodule aubridge.so\nmodule account.so\nmodule menu.so\n")
    (conf / "accounts").write_text(f"<sip:test@127.0.0.1:{port}>;regint=0\n")
    proc = await asyncio.create_subprocess_exec(
        "baresip", "-f", str(conf), "-e", f"/dial sip:baresip@127.0.0.1:{svc.sip.port}", "-t", "20",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=str(conf))
    try:
        job = (await wait_job_done(svc.store, timeout=30))[0]
    finally:
        if proc.returncode is None:
            proc.terminate()
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert job.status.value == "completed" and job.metadata["ended_by"] == "bye_caller", out.decode()[-2000:]
    assert "baresip" in job.metadata["sip"]["to"]
    text = await leg_text(svc.store, job.id, "caller")
    assert corpus.wer(CALLER, text) <= 0.15, (text, out.decode()[-1500:])


async def test_bridge_mode_both_legs_and_each_party_hears_the_other(tmp_path, pool):
    callee_port = free_sip_port()
    srv = await start_server(tmp_path / "data", pool, **{
        "sip.enabled": "true", "server.sip_port": "0", "sip.workers": "1",
        "sip.routes": f"agent=sip:agent@127.0.0.1:{callee_port}"})
    try:
        svc = srv.service
        caller_wav = speech_wav(tmp_path / "caller.wav", CALLER, lead=0.5, tail=4.5)
        agent_wav = speech_wav(tmp_path / "agent.wav", AGENT, lead=5.0, tail=1.0)
        heard = tmp_path / "callee-heard.wav"
        callee = asyncio.create_task(finish_peer(await start_peer(  # returns once the callee is bound
            "answer", "--port", str(callee_port), "--play", str(agent_wav), "--record", str(heard),
            "--timeout", "40"), 45))
        rc, info, err = await peer("call", f"sip:agent@127.0.0.1:{svc.sip.port}", "--play", str(caller_wav),
                                   "--hold-s", "5")
        assert rc == 0, err
        await asyncio.wait_for(callee, 30)
        job = (await wait_job_done(svc.store))[0]
        assert job.speakers == ["caller", "agent"] and job.config["target"].startswith("sip:agent@")
        assert corpus.wer(CALLER, await leg_text(svc.store, job.id, "caller")) <= 0.2
        assert corpus.wer(AGENT, await leg_text(svc.store, job.id, "agent")) <= 0.2
        with wave.open(job.audio_path) as w:
            assert w.getnchannels() == 2
        # the callee heard the caller: transcribe its recording offline with the same model
        pcm, rate = corpus.read_wav(heard)
        if rate != SR:
            pcm = corpus._resample(pcm, rate, SR)
        hyp = await pool.decode(pcm, _offline_opts())
        assert corpus.wer(CALLER, hyp.text) <= 0.25, hyp.text
    finally:
        await srv.stop()


def _offline_opts():
    from bridge.recognizer.engines import DecodeOptions

    return DecodeOptions(offline=True)


def _invite(port: int, local_port: int, *, sdp: str | None, call_id: str | None = None, bad: bool = False) -> bytes:
    call_id = call_id or uuid.uuid4().hex
    body = sdp.encode() if sdp is not None else b""
    lines = [f"INVITE sip:test@127.0.0.1:{port} SIP/2.0",
             f"Via: SIP/2.0/UDP 127.0.0.1:{local_port};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport",
             "Max-Forwards: 70", f"From: <sip:probe@127.0.0.1:{local_port}>;tag=abc", f"To: <sip:test@127.0.0.1:{port}>",
             f"Contact: <sip:probe@127.0.0.1:{local_port}>"]
    if not bad:
        lines += [f"Call-ID: {call_id}", "CSeq: 1 INVITE"]
    if sdp is not None:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _sdp(local_port: int, pts: str, rtpmap: str) -> str:
    return (f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {local_port + 2} RTP/AVP {pts}\r\n{rtpmap}")


async def _udp_exchange(port: int, data: bytes, want_final: bool = True, timeout: float = 5.0) -> list[str]:
    """Send one datagram to the service's SIP port and collect the status lines that come back."""
    loop = asyncio.get_running_loop()
    got: list[str] = []
    done = loop.create_future()

    class P(asyncio.DatagramProtocol):
        def datagram_received(self, d, addr):
            line = d.split(b"\r\n", 1)[0].decode(errors="replace")
            got.append(line)
            code = int(line.split()[1]) if line.startswith("SIP/2.0 ") else 0
            if code >= 200 and not done.done():
                done.set_result(None)

    tr, _ = await loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", 0))
    local_port = tr.get_extra_info("sockname")[1]
    tr.sendto(data.replace(b"LOCALPORT", str(local_port).encode()), ("127.0.0.1", port))
    try:
        await asyncio.wait_for(done, timeout)
    except asyncio.TimeoutError:
        pass
    tr.close()
    return got


async def test_bad_sip_input_gets_sip_errors_and_service_keeps_answering(sip_server, tmp_path):
    port = sip_server.service.sip.port
    gsm = _sdp(40000, "3", "a=rtpmap:3 GSM/8000\r\n")
    replies = {
        "garbage": await _udp_exchange(port, b"\x00\x01hello not sip\r\n\r\n", timeout=1.0),
        "no_call_id": await _udp_exchange(port, _invite(port, 40000, sdp=_sdp(40000, "0", ""), bad=True)),
        "no_sdp": await _udp_exchange(port, _invite(port, 40000, sdp=None)),
        "gsm_only": await _udp_exchange(port, _invite(port, 40000, sdp=gsm)),
    }
    assert replies["garbage"] == []
    assert replies["no_call_id"][-1].startswith("SIP/2.0 400")
    assert replies["no_sdp"][-1].startswith("SIP/2.0 488")
    assert replies["gsm_only"][-1].startswith("SIP/2.0 488")
    # and a proper call still works afterwards
    wav = speech_wav(tmp_path / "ok.wav", CALLER)
    rc, info, err = await peer("call", f"sip:after@127.0.0.1:{port}", "--play", str(wav))
    assert rc == 0 and info["sip_code"] == 200, err
    job = (await wait_job_done(sip_server.service.store))[0]
    assert corpus.wer(CALLER, await leg_text(sip_server.service.store, job.id, "caller")) <= 0.15
    metrics = sip_server.service.metrics.render().decode()
    assert 'callbridge_sip_rejected{status="488"} 2.0' in metrics and 'callbridge_sip_rejected{status="400"} 1.0' in metrics
    assert "callbridge_sip_workers_alive 2.0" in metrics


async def test_tcp_caller_through_the_dispatcher(sip_server, tmp_path):
    svc = sip_server.service
    wav = speech_wav(tmp_path / "caller.wav", CALLER)
    rc, info, err = await peer("call", f"sip:tcp@127.0.0.1:{svc.sip.port};transport=tcp", "--play", str(wav))
    assert rc == 0 and info["sip_code"] == 200, err
    job = (await wait_job_done(svc.store))[0]
    assert job.metadata["ended_by"] == "bye_caller"
    assert corpus.wer(CALLER, await leg_text(svc.store, job.id, "caller")) <= 0.15


async def test_dtmf_and_max_duration(tmp_path, pool):
    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                         "sip.workers": "1", "limits.max_duration_s": "4"})
    try:
        svc = srv.service
        wav = speech_wav(tmp_path / "long.wav", CALLER, tail=6.0)
        rc, info, err = await peer("call", f"sip:x@127.0.0.1:{svc.sip.port}", "--play", str(wav),
                                   "--dtmf", "42#", "--dtmf-at", "1.0")
        assert rc == 0, err
        assert info["hangup_by"] == "remote"  # the service hung up at the maximum duration
        job = (await wait_job_done(svc.store))[0]
        assert job.status.value == "completed" and job.metadata["ended_by"] == "max_duration"
        assert 3.5 <= job.duration_s <= 5.0
        assert "".join(d["digit"] for d in job.metadata["dtmf"]) == "42#"
    finally:
        await srv.stop()


class _FloodCaller(asyncio.DatagramProtocol):
    """A bare UDP user agent for floods: sends INVITEs and, like a flood tool, neither ACKs the
    200s nor answers the BYEs that follow until told to (`catch_up`)."""

    def __init__(self) -> None:
        self.finals: dict[str, SipMessage] = {}
        self.requests: list[tuple[SipMessage, tuple[str, int]]] = []
        self.polite = False
        self.changed = asyncio.Event()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data, addr) -> None:
        m = parse_message(data)
        if m.is_response and (m.status or 0) >= 200 and m.call_id not in self.finals:
            self.finals[m.call_id or ""] = m
            if m.status == 200 and self.polite:
                self._send_to_contact(m, "ACK", 1)
        elif m.is_request:
            self.requests.append((m, addr))
            if self.polite:
                self.answer_requests()
        self.changed.set()

    def invite(self, sip_port: int, call_id: str) -> None:
        sdp = _sdp(self.port, "0", "a=rtpmap:0 PCMU/8000\r\n")
        self.transport.sendto(_invite(sip_port, self.port, sdp=sdp, call_id=call_id), ("127.0.0.1", sip_port))

    def _send_to_contact(self, resp: SipMessage, method: str, cseq: int) -> None:
        contact = name_addr_uri(resp.get("Contact") or "")
        host, port = contact.split("@", 1)[1].split(";")[0].split(":")
        req = SipMessage(method=method, uri=contact)
        req.headers += [("Via", f"SIP/2.0/UDP 127.0.0.1:{self.port};branch={new_branch()};rport"),
                        ("Max-Forwards", "70"), ("From", resp.get("From") or ""), ("To", resp.get("To") or ""),
                        ("Call-ID", resp.call_id or ""), ("CSeq", f"{cseq} {method}"), ("Content-Length", "0")]
        self.transport.sendto(req.to_bytes(), (host, int(port)))

    def catch_up(self) -> None:
        """ACK every 200 so far and answer every request, now and from now on."""
        self.polite = True
        for m in self.finals.values():
            if m.status == 200:
                self._send_to_contact(m, "ACK", 1)
        self.answer_requests()

    def hang_up(self, call_id: str) -> None:
        self._send_to_contact(self.finals[call_id], "BYE", 2)

    def answer_requests(self) -> None:
        for req, addr in self.requests:
            if req.method != "ACK":
                self.transport.sendto(make_response(req, 200).to_bytes(), addr)
        self.requests.clear()

    async def until(self, cond, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.monotonic()))


async def _until_free(worker) -> None:
    while worker.used:  # the dispatcher's view, set by the worker's load reports
        await asyncio.sleep(0.02)


async def test_slots_after_a_flood_follow_the_workers(tmp_path, pool):
    """A flood of INVITEs on one worker (4 slots): 4 answered, the rest refused. The flood tool
    ACKs nothing, and the worker ends the 4 calls (no RTP): pjsua keeps their slots until the
    ACK comes or times out, so the dispatcher must refuse a new call itself (503), not send it to
    a worker that answers 486. Once the caller catches up, the worker says its slots are free and
    the next call is answered."""
    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                         "sip.workers": "1", "sip.rtp_timeout_s": "1"})
    loop = asyncio.get_running_loop()
    transport, ua = await loop.create_datagram_endpoint(_FloodCaller, local_addr=("127.0.0.1", 0))
    try:
        sip = srv.service.sip
        flood = [f"flood-{i}" for i in range(10)]
        for cid in flood:
            ua.invite(sip.port, cid)
        await ua.until(lambda: all(c in ua.finals for c in flood))
        codes = sorted(ua.finals[c].status for c in flood)
        assert codes.count(200) == 4 and all(c >= 300 for c in codes if c != 200), codes
        await wait_job_done(srv.service.store, n=4)  # the worker ended the 4 calls
        ua.invite(sip.port, "while-unacked")
        await ua.until(lambda: "while-unacked" in ua.finals)
        busy = ua.finals["while-unacked"]
        assert busy.status == 503 and busy.get("Retry-After"), (busy.status, busy.reason, sip.dispatcher.stats())
        ua.catch_up()  # ACKs, then answers the BYEs: pjsua frees the slots and the worker reports it
        await asyncio.wait_for(_until_free(sip.dispatcher.workers[0]), 20)
        ua.invite(sip.port, "after")
        await ua.until(lambda: "after" in ua.finals)
        assert ua.finals["after"].status == 200, ua.finals["after"].status
        ua.hang_up("after")
    finally:
        transport.close()
        await srv.stop()


async def _state(cond, timeout: float = 30.0, what: str = "") -> None:
    """Until `cond()` holds (in-process service state; a coroutine function is awaited), checked
    every 20 ms."""
    async def holds() -> bool:
        r = cond()
        return await r if inspect.isawaitable(r) else r

    async def go() -> None:
        while not await holds():
            await asyncio.sleep(0.02)
    try:
        await asyncio.wait_for(go(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


async def test_worker_killed_mid_call_job_fails_with_what_was_received_and_worker_returns(tmp_path, pool):
    """kill -9 of the SIP worker holding a call: the job ends `failed` (INTERNAL) keeping the
    finals and audio received so far, the dispatcher restarts the worker and the next call works."""
    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                         "sip.workers": "1"})
    caller = None
    try:
        svc = srv.service
        store = svc.store
        w = svc.sip.workers[0]
        old_pid = w.proc.pid
        wav = speech_wav(tmp_path / "long.wav", CALLER, tail=30.0)
        caller = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sip.peer", "call", f"sip:x@127.0.0.1:{svc.sip.port}", "--play", str(wav),
            cwd=str(ROOT), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        async def a_final_saved() -> bool:
            jobs = (await store.list_jobs())[0]
            return bool(jobs and await store.segments(jobs[0].id))

        await _state(a_final_saved, 60, "a final saved for the call")
        job_id = (await store.list_jobs())[0][0].id
        saved = [g.text for g in await store.segments(job_id)]
        os.kill(old_pid, signal.SIGKILL)
        job = (await wait_job_done(store))[0]
        assert job.id == job_id and job.status.value == "failed" and job.error["code"] == "INTERNAL"
        assert "exited" in job.error["message"] and job.metadata["ended_by"] == "worker_exited"
        assert [g.text for g in await store.segments(job_id)][: len(saved)] == saved
        assert corpus.wer(CALLER, await leg_text(store, job_id, "caller")) <= 0.15
        with wave.open(job.audio_path) as f:  # the audio received until the kill is kept
            assert f.getnframes() / f.getframerate() >= (await store.segments(job_id))[0].end
        await _state(lambda: w.restarts == 1 and w.hello.is_set() and w.proc.pid != old_pid
                     and svc.sip.dispatcher.workers[0].alive, 30, "the worker restarted")
        ok = speech_wav(tmp_path / "ok.wav", CALLER)
        rc, info, err = await peer("call", f"sip:again@127.0.0.1:{svc.sip.port}", "--play", str(ok))
        assert rc == 0 and info["sip_code"] == 200, err
        done = await wait_job_done(store, n=2)
        again = next(j for j in done if j.id != job_id)
        assert again.status.value == "completed"
        assert corpus.wer(CALLER, await leg_text(store, again.id, "caller")) <= 0.15
    finally:
        if caller is not None and caller.returncode is None:
            caller.kill()
            await caller.wait()
        await srv.stop()
