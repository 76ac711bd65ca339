"""SIP calls go through the session layer like streams (bridge/sessions/): the owner's credits and
session limit are checked before the INVITE reaches a worker, and the call's credits are
reserved while it runs and settled to the audio it carried. Real service, real pjsua2 callers."""

from __future__ import annotations

import asyncio
import math
import time

from bench.drive import wait_for
from bridge.calls import job_credits
from bridge.stores import DB_NAME
from bridge.stores.keys import key_id_for
from bridge.stores.sqlite.keys import SqliteKeyStore
from tests.serving import API_KEY, start_server
from tests.test_capacity import _end, _open
from tests.test_sip_service import CALLER, peer, speech_wav, wait_job_done

PER_MINUTE = 220


def _metered_key(data_dir, credits: int) -> str:
    """A key with a balance, created in the service's database before it starts (as `callbridge keys
    create --credits` does); SIP calls are attributed to it with sip.owner_key."""
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = SqliteKeyStore(str(data_dir / DB_NAME))
    try:
        key, _secret = keys.create_key(name="pbx", credits=credits)
    finally:
        keys.close()
    return key.id


def _no_reservations(svc):
    async def none_open() -> bool:
        return await svc.keys.open_reservations() == {}
    return none_open


def _refused_metric(svc, code: str) -> float:
    return svc.metrics.registry.get_sample_value("callbridge_sessions_refused_total",
                                                 {"source": "sip", "code": code}) or 0.0


async def _live_sip_job(store, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        live = [j for j in (await store.list_jobs())[0] if j.source.value == "sip" and j.status.value == "live"]
        if live:
            return live[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no live SIP job")


async def test_sip_call_refused_402_when_its_owner_has_no_credits(tmp_path, pool):
    from tests.test_sip_dispatcher import SDP, Peer, request

    owner = _metered_key(tmp_path / "data", credits=100)  # a call reserves 60 s x 220/min = 220
    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                          "sip.workers": "1", "sip.owner_key": owner,
                                                          "limits.max_duration_s": "60"})
    svc = srv.service
    loop = asyncio.get_running_loop()
    transport, raw = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    try:
        wav = speech_wav(tmp_path / "caller.wav", CALLER)
        rc, info, err = await peer("call", f"sip:support@127.0.0.1:{svc.sip.port}", "--play", str(wav))
        assert rc == 1 and info["sip_code"] == 402, (info, err[-500:])  # what the caller sees
        raw.send(request("INVITE", raw.port, call_id="broke-1", body=SDP), ("127.0.0.1", svc.sip.port))
        resp = await raw.expect_final(402)
        assert resp.reason == "Payment Required", resp.reason
        warning = resp.get("Warning") or ""
        assert "balance 100 credits is short of the 220 reserved" in warning, resp.headers
        assert resp.get("Retry-After") is None  # waiting does not bring credits
        assert (await svc.store.list_jobs())[0] == []  # no job, no slot, no reservation left behind
        assert svc.calls.active(owner) == 0 and await svc.keys.open_reservations() == {}
        assert (await svc.keys.get_key(owner)).balance == 100
        assert _refused_metric(svc, "INSUFFICIENT_CREDITS") == 2
    finally:
        transport.close()
        await srv.stop()


async def test_sip_call_refused_486_at_its_owners_session_limit(tmp_path, pool):
    """The SIP owner's live sessions count against `limits.max_sessions_per_key`, whichever ingress
    they came in on: a live SIP call refuses the owner's next SIP call and its next stream."""
    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                          "sip.workers": "2", "sip.owner_key": key_id_for(API_KEY),
                                                          "limits.max_sessions_per_key": "1"})
    svc = srv.service
    try:
        uri = f"sip:support@127.0.0.1:{svc.sip.port}"
        long_wav = speech_wav(tmp_path / "long.wav", CALLER, tail=6.0)
        first = asyncio.ensure_future(peer("call", uri, "--play", str(long_wav)))
        live = await _live_sip_job(svc.store)
        assert svc.calls.active(key_id_for(API_KEY)) == 1
        rc, info, err = await peer("call", uri, "--play", str(speech_wav(tmp_path / "short.wav", CALLER)))
        assert rc == 1 and info["sip_code"] == 486, (info, err[-500:])
        http, ws, frame = await _open(srv.url)  # the same key's stream is refused too
        assert frame["type"] == "error" and frame["code"] == "RATE_LIMITED", frame
        await ws.close()
        await http.close()
        assert _refused_metric(svc, "RATE_LIMITED") == 1
        rc, info, err = await first
        assert rc == 0 and info["sip_code"] == 200, err[-500:]
        job = (await wait_job_done(svc.store))[0]
        assert job.id == live.id and job.status.value == "completed"
        assert await wait_for(lambda: svc.calls.active(key_id_for(API_KEY)) == 0)
        http, ws, frame = await _open(srv.url)  # the slot is free again once the call ended
        assert frame["type"] == "ready", frame
        assert (await _end(http, ws))["type"] == "completed"
    finally:
        await srv.stop()


async def test_sip_call_credits_reserved_during_the_call_and_settled_to_its_audio(tmp_path, pool):
    owner = _metered_key(tmp_path / "data", credits=1000)
    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                          "sip.workers": "1", "sip.owner_key": owner,
                                                          "limits.max_duration_s": "120"})
    svc = srv.service
    try:
        wav = speech_wav(tmp_path / "caller.wav", CALLER, tail=3.0)
        call = asyncio.ensure_future(peer("call", f"sip:support@127.0.0.1:{svc.sip.port}", "--play", str(wav)))
        live = await _live_sip_job(svc.store)
        held = math.ceil(120 * 1 * PER_MINUTE / 60)  # the maximum duration x one leg, like a stream's
        assert await svc.keys.open_reservations() == {live.id: held}
        k = await svc.keys.get_key(owner)
        assert (k.balance, k.reserved) == (1000, held)
        rc, info, err = await call
        assert rc == 0 and info["sip_code"] == 200, err[-500:]
        job = (await wait_job_done(svc.store))[0]
        assert job.id == live.id and job.status.value == "completed"
        assert abs(job.duration_s - info["sent_seconds"]) < 1.0, (job.duration_s, info)
        used = math.ceil(job_credits(job, PER_MINUTE))
        assert used > 0
        assert await wait_for(_no_reservations(svc))
        k = await svc.keys.get_key(owner)
        assert (k.balance, k.reserved) == (1000 - used, 0)  # charged the audio, not the 440 held
        audio = svc.metrics.registry.get_sample_value("callbridge_audio_seconds_total", {"source": "sip"})
        assert audio is not None and abs(audio - job.duration_s) < 0.5, (audio, job.duration_s)
    finally:
        await srv.stop()


async def test_sip_call_straight_to_a_worker_is_admitted_when_it_starts(tmp_path, pool):
    """With a proxy such as Kamailio sending INVITEs straight to the worker ports (docs/sip.md), the
    dispatcher never screens them: the call is admitted when the worker reports it started, and one
    its owner cannot pay for is hung up at once, leaving no job."""
    owner = _metered_key(tmp_path / "data", credits=100)
    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                          "sip.workers": "1", "sip.owner_key": owner,
                                                          "limits.max_duration_s": "60"})
    svc = srv.service
    try:
        wav = speech_wav(tmp_path / "caller.wav", CALLER, tail=6.0)
        rc, info, err = await peer("call", f"sip:support@127.0.0.1:{svc.sip.workers[0].port}", "--play", str(wav))
        assert rc == 0 and info["sip_code"] == 200, err[-500:]  # the worker answered before anyone asked
        assert info["hangup_by"] == "remote" and info["sent_seconds"] < 5.0, info  # ...and the service hung up
        assert (await svc.store.list_jobs())[0] == []
        assert svc.calls.active(owner) == 0 and await svc.keys.open_reservations() == {}
        assert _refused_metric(svc, "INSUFFICIENT_CREDITS") == 1
    finally:
        await srv.stop()


async def test_an_invite_that_fails_before_its_call_starts_gives_back_its_slot_and_credits(tmp_path, pool):
    """In bridge mode the INVITE holds its owner's slot and the credits of both legs while the target
    rings; a busy target ends the INVITE, and all of it goes back without a job or a charge."""
    from tests.test_sip_dispatcher import SDP, Peer, request

    owner = _metered_key(tmp_path / "data", credits=1000)
    loop = asyncio.get_running_loop()
    t_agent, agent = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                          "sip.workers": "1", "sip.owner_key": owner,
                                                          "limits.max_duration_s": "60",
                                                          "sip.routes": f"*=sip:agent@127.0.0.1:{agent.port}"})
    svc = srv.service
    t_caller, caller = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    try:
        caller.send(request("INVITE", caller.port, call_id="busy-1", body=SDP), ("127.0.0.1", svc.sip.port))
        assert (await caller.recv(timeout=10)).status == 100
        dialled = await agent.expect("INVITE", timeout=10)  # the target rings: the INVITE holds its admission
        assert list((await svc.keys.open_reservations()).values()) == [2 * PER_MINUTE]  # 60 s x 2 legs
        assert svc.calls.active(owner) == 1
        agent.answer(dialled, 486)
        while (m := await caller.recv(timeout=10)).is_response and (m.status or 0) < 300:
            pass
        assert m.is_response and m.status == 486, m.status  # the caller hears the target's answer
        assert await wait_for(_no_reservations(svc)), await svc.keys.open_reservations()
        assert svc.calls.active(owner) == 0 and (await svc.keys.get_key(owner)).balance == 1000
        assert (await svc.store.list_jobs())[0] == []
    finally:
        t_caller.close()
        await srv.stop()
        t_agent.close()
