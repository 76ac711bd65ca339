"""Admission by capacity through the real service: past its decode capacity, new sessions are refused
with a clear, temporary error, live ones go on, and a leg that ends makes room again."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest
import numpy as np

from bench.drive import wait_for
from bridge.client.stream import StreamClient
from bridge.recognizer.pool import RecognizerPool
from tests.serving import API_KEY, start_server
from tests.test_webrtc import OFFER, SR, _offer_sdp, sil, speech


async def _open(url: str, channels: int = 1) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse, dict]:
    """A raw ingest socket after its start frame: (session, socket, the server's first frame)."""
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(f"{url}/v1/transcription/stream?api_key={API_KEY}")
    await ws.send_str(json.dumps({"type": "start", "channels": channels}))
    return http, ws, json.loads((await ws.receive()).data)


async def _refused(url: str, channels: int = 1) -> tuple[dict, int | None]:
    """The error frame and close code of a session the server refuses."""
    http, ws, first = await _open(url, channels)
    try:
        msg = await ws.receive()
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), (first, msg)
        return first, ws.close_code
    finally:
        await ws.close()
        await http.close()


async def _end(http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> dict:
    await ws.send_str(json.dumps({"type": "end"}))
    last = None
    async for msg in ws:
        last = json.loads(msg.data)
    await http.close()
    return last


async def _get(url: str, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + path) as r:
            return r.status, await r.text()


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


async def test_capacity_admits_n_refuses_the_next_and_admits_again_when_a_leg_ends(tmp_path, pool):
    srv = await start_server(tmp_path / "data", pool, **{"capacity.max_legs": "3",
                                                          "capacity.max_final_latency_s": "3600"})
    svc = srv.service
    try:
        a = await _open(srv.url)
        b = await _open(srv.url, channels=2)  # a stereo session takes two legs
        assert a[2]["type"] == "ready" and b[2]["type"] == "ready", (a[2], b[2])
        frame, close = await _refused(srv.url)
        assert frame["type"] == "error" and frame["code"] == "RATE_LIMITED", frame
        assert "capacity" in frame["message"] and frame["retry_after_s"] == 5, frame
        assert close == 4429
        status, body = await _get(srv.url, "/healthz")
        cap = json.loads(body)["capacity"]
        assert status == 200 and cap["legs_free"] == 0 and cap["admitting"] is False, cap
        assert cap["legs_live"] == 3 and cap["legs_capacity"] == 3, cap
        _, text = await _get(srv.url, "/metrics")
        assert _metric(text, "callbridge_capacity_admitting") == 0
        assert _metric(text, "callbridge_capacity_legs_free") == 0
        assert _metric(text, 'callbridge_capacity_refused_total{source="stream"}') == 1

        assert (await _end(*b[:2]))["type"] == "completed"  # two legs free again
        assert await wait_for(lambda: svc.calls.legs == 1), svc.calls.legs
        c = await _open(srv.url, channels=2)
        assert c[2]["type"] == "ready", c[2]
        frame, close = await _refused(srv.url)  # full again: 1 + 2 legs
        assert frame["code"] == "RATE_LIMITED" and close == 4429, frame
        for s in (a, c):
            assert (await _end(*s[:2]))["type"] == "completed"
        jobs, _ = await svc.store.list_jobs()
        assert len(jobs) == 3  # refused sessions leave no job
        assert await wait_for(lambda: svc.calls.legs == 0)
        status, body = await _get(srv.url, "/healthz")
        assert json.loads(body)["capacity"]["legs_free"] == 3
    finally:
        await srv.stop()


async def test_webrtc_offer_over_capacity_is_503_with_retry_after(tmp_path, pool):
    srv = await start_server(tmp_path / "data", pool, **{"capacity.max_legs": "1",
                                                          "capacity.max_final_latency_s": "3600"})
    try:
        live = await _open(srv.url)
        assert live[2]["type"] == "ready"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{srv.url}{OFFER}", data=json.dumps({"sdp": await _offer_sdp(), "type": "offer"}),
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                status, retry, body = r.status, r.headers.get("Retry-After"), await r.json()
        assert status == 503 and retry == "5", (status, retry, body)
        assert body["error"]["code"] == "RATE_LIMITED" and "capacity" in body["error"]["message"], body
        assert (await _end(*live[:2]))["type"] == "completed"
        assert len((await srv.service.store.list_jobs())[0]) == 1
    finally:
        await srv.stop()


async def _speak_one_final(url: str) -> None:
    pcm = np.concatenate([sil(0.3), speech("I would like to check the status of my order, please."), sil(1.0)])
    async with StreamClient(url, api_key=API_KEY, sample_rate=SR) as s:
        await s.send_audio(pcm.tobytes())
        await s.end()
        events = [ev async for ev in s]
    assert any(e["type"] == "final" and e["text"] for e in events), events


async def test_late_finals_close_admission_until_the_pool_catches_up(tmp_path, model_path):
    """The live signal: finals that spent longer in the pool than the bound refuse new sessions
    while a leg is live (whatever the leg count), and admission reopens once they fall out of the window."""
    own = RecognizerPool(model_path, size=1, threads=1)  # its own pool: no other test's finals in the window
    own.start()
    srv = await start_server(tmp_path / "data", own, **{"capacity.max_final_latency_s": "0.001",
                                                         "capacity.window_s": "2", "capacity.min_finals": "1"})
    try:
        live = await _open(srv.url)  # a leg to keep on time: the node is not idle
        assert live[2]["type"] == "ready", live[2]
        await _speak_one_final(srv.url)
        frame, close = await _refused(srv.url)
        assert frame["code"] == "RATE_LIMITED" and "behind" in frame["message"] and close == 4429, frame
        assert await wait_for(lambda: srv.service.admission.headroom().admitting, timeout=30)
        http, ws, first = await _open(srv.url)
        assert first["type"] == "ready", first
        assert (await _end(http, ws))["type"] == "completed"
        assert (await _end(*live[:2]))["type"] == "completed"
    finally:
        await srv.stop()
        own.close()


async def test_one_slow_final_does_not_refuse_an_idle_node_nor_a_busy_one(tmp_path, model_path):
    """Latency is judged on evidence: an idle node always admits, and a busy one needs
    capacity.min_finals late finals in the window (default 5), not one long utterance."""
    own = RecognizerPool(model_path, size=1, threads=1)
    own.start()
    srv = await start_server(tmp_path / "data", own, **{"capacity.max_final_latency_s": "0.001",
                                                         "capacity.window_s": "3600"})
    try:
        await _speak_one_final(srv.url)
        h = srv.service.admission.headroom()
        assert h.finals_in_window >= 1 and h.final_latency_p95_s > h.max_final_latency_s, h  # late, in the window
        assert h.legs_live == 0 and h.admitting, h  # idle: admits
        a = await _open(srv.url)
        assert a[2]["type"] == "ready", a[2]
        h = srv.service.admission.headroom()
        assert h.legs_live == 1 and h.finals_in_window < 5 and h.admitting, h  # busy, too few finals to judge
        b = await _open(srv.url)
        assert b[2]["type"] == "ready", b[2]
        for s in (a, b):
            assert (await _end(*s[:2]))["type"] == "completed"
    finally:
        await srv.stop()
        own.close()


async def test_sip_invite_over_capacity_gets_503_with_retry_after(tmp_path, pool):
    """The dispatcher asks the service before it hands an INVITE to a worker (bridge/ingress/sip.py)."""

    from tests.test_sip_dispatcher import SDP, Peer, request

    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                          "sip.workers": "1", "capacity.max_legs": "1",
                                                          "capacity.max_final_latency_s": "3600"})
    loop = asyncio.get_running_loop()
    transport, caller = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    try:
        live = await _open(srv.url)
        assert live[2]["type"] == "ready"
        caller.send(request("INVITE", caller.port, call_id="cap-1", body=SDP), ("127.0.0.1", srv.service.sip.port))
        resp = await caller.expect_final(503)
        assert resp.get("Retry-After") == "5", resp.headers
        assert "capacity" in (resp.get("Warning") or ""), resp.headers
        assert [j.source.value for j in (await srv.service.store.list_jobs())[0]] == ["stream"]  # no SIP job
        assert (await _end(*live[:2]))["type"] == "completed"
        assert await wait_for(lambda: srv.service.calls.legs == 0)
        caller.send(request("INVITE", caller.port, call_id="cap-2", body=SDP), ("127.0.0.1", srv.service.sip.port))
        assert (await caller.recv(timeout=10)).status == 100  # room again: handed to the worker
    finally:
        transport.close()
        await srv.stop()


async def test_concurrent_opens_cannot_overshoot_the_cap(tmp_path, pool):
    """Opening a session awaits (credits, the job row) before its call counts as live: the legs it
    holds meanwhile must count, or every open in flight passes the check."""
    srv = await start_server(tmp_path / "data", pool, **{"capacity.max_legs": "3",
                                                          "capacity.max_final_latency_s": "3600"})
    try:
        opened = await asyncio.gather(*(_open(srv.url) for _ in range(6)))
        firsts = [first for _, _, first in opened]
        assert sorted(f["type"] for f in firsts) == ["error"] * 3 + ["ready"] * 3, firsts
        assert all(f["code"] == "RATE_LIMITED" for f in firsts if f["type"] == "error"), firsts
        assert srv.service.calls.legs == 3 and srv.service.admission.headroom().legs_reserved == 0
        for http, ws, first in opened:
            if first["type"] == "ready":
                assert (await _end(http, ws))["type"] == "completed"
            else:
                await ws.close()
                await http.close()
    finally:
        await srv.stop()


async def test_sip_invite_refused_for_disk_space_is_counted(tmp_path, pool):
    """A SIP refusal for disk space shows in callbridge_errors_total like a stream's STORAGE_FULL."""
    from tests.test_sip_dispatcher import SDP, Peer, request

    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                          "sip.workers": "1", "limits.min_free_disk_mb": str(1 << 40)})
    loop = asyncio.get_running_loop()
    transport, caller = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    try:
        caller.send(request("INVITE", caller.port, call_id="disk-1", body=SDP), ("127.0.0.1", srv.service.sip.port))
        resp = await caller.expect_final(503)
        assert "reserve" in (resp.get("Warning") or ""), resp.headers
        _, text = await _get(srv.url, "/metrics")
        assert _metric(text, 'callbridge_errors_total{code="STORAGE_FULL"}') == 1
    finally:
        transport.close()
        await srv.stop()


async def test_sip_invites_arriving_together_cannot_overshoot_the_cap(tmp_path, pool):
    """A SIP leg counts as live only once its worker reports call_started, so each INVITE admitted
    before that must hold its legs: of 4 INVITEs sent at once with room for 1, exactly 1 reaches a
    worker. Its hold is given back when the call registers."""
    from tests.test_sip_dispatcher import SDP, Peer, request

    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                          "sip.workers": "1", "capacity.max_legs": "1",
                                                          "capacity.max_final_latency_s": "3600"})
    svc = srv.service
    loop = asyncio.get_running_loop()
    transport, caller = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    try:
        ids = [f"burst-{i}" for i in range(4)]
        for cid in ids:  # one burst: the dispatcher screens them all before any worker answers
            caller.send(request("INVITE", caller.port, call_id=cid, body=SDP), ("127.0.0.1", svc.sip.port))
        first: dict[str, int] = {}  # past 100 Trying (sent before the admission check is awaited)
        while len(first) < len(ids):
            m = await caller.recv(timeout=10)
            if m.is_response and m.status != 100:
                first.setdefault(m.call_id or "", m.status or 0)
        refused = sorted(s for s in first.values() if s >= 300)
        assert refused == [503, 503, 503], first  # one admitted: the worker rings (18x) or answers
        assert await wait_for(lambda: svc.calls.legs == 1, timeout=20), svc.calls.legs  # the admitted call started
        h = svc.admission.headroom()
        assert h.legs_live == 1 and h.legs_reserved == 0, h  # its hold was given back when it registered
    finally:
        transport.close()
        await srv.stop()


async def test_sip_invite_hold_is_given_back_when_the_call_fails_before_it_starts(tmp_path, pool):
    """The hold lasts while the call rings (bridge mode: the target is being dialled) and is given
    back when the INVITE fails instead, so a failed call leaves no leg reserved."""
    from tests.test_sip_dispatcher import SDP, Peer, request

    loop = asyncio.get_running_loop()
    t_agent, agent = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                          "sip.workers": "1", "capacity.max_legs": "2",
                                                          "capacity.max_final_latency_s": "3600",
                                                          "sip.routes": f"*=sip:agent@127.0.0.1:{agent.port}"})
    svc = srv.service
    t_caller, caller = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    try:
        caller.send(request("INVITE", caller.port, call_id="fails-1", body=SDP), ("127.0.0.1", svc.sip.port))
        assert (await caller.recv(timeout=10)).status == 100
        dialled = await agent.expect("INVITE", timeout=10)  # the worker dials the target: still ringing
        assert svc.admission.headroom().legs_reserved == 2  # a bridged call's two legs are held meanwhile
        frame, close = await _refused(srv.url)
        assert frame["code"] == "RATE_LIMITED" and "capacity" in frame["message"], frame
        agent.answer(dialled, 486)
        while (m := await caller.recv(timeout=10)).is_response and (m.status or 0) < 300:
            pass
        assert m.is_response and m.status >= 400, m.status  # the caller hears the failure
        assert await wait_for(lambda: svc.admission.headroom().legs_reserved == 0), svc.admission.headroom()
        assert svc.calls.legs == 0 and svc.admission.headroom().admitting
    finally:
        t_caller.close()
        await srv.stop()
        t_agent.close()


async def test_leg_cap_follows_the_calibrated_decode_speed(tmp_path, pool):
    """Without a configured count the cap comes from the decode speed the pool timed at start:
    contexts x int(final_share / (speed x speech_share)); what the burst case relies on, since a
    burst arrives before any final can say the pool is behind (docs/recognizer.md, "Admission")."""
    assert pool.calibrated_speed is not None and 0 < pool.calibrated_speed < 5, pool.calibrated_speed
    srv = await start_server(tmp_path / "data", pool, **{"capacity.legs_per_context": "0",
                                                          "capacity.final_share": "1", "capacity.speech_share": "0.05"})
    try:
        h = srv.service.admission.headroom()
        assert h.cap_source == "decode speed" and h.decode_s_per_audio_s is not None, h
        per = max(1, int(1 / (h.decode_s_per_audio_s * 0.05)))
        assert h.legs_per_context == per and h.legs_capacity == pool.size * per, h
        status, body = await _get(srv.url, "/healthz")
        cap = json.loads(body)["capacity"]
        assert cap["cap_source"] == "decode speed" and cap["legs_capacity"] == h.legs_capacity, cap
        _, text = await _get(srv.url, "/metrics")
        assert _metric(text, "callbridge_capacity_decode_seconds_per_audio_second") > 0
    finally:
        await srv.stop()
    # a planned share too small for one more leg per context: the cap is one leg per context
    srv = await start_server(tmp_path / "data2", pool, **{"capacity.legs_per_context": "0",
                                                           "capacity.final_share": "0.001"})
    try:
        opened = [await _open(srv.url) for _ in range(pool.size)]
        assert all(o[2]["type"] == "ready" for o in opened), [o[2] for o in opened]
        frame, close = await _refused(srv.url)
        assert frame["code"] == "RATE_LIMITED" and close == 4429, frame
        assert "cap from the decode speed" in frame["message"], frame
        for o in opened:
            assert (await _end(*o[:2]))["type"] == "completed"
    finally:
        await srv.stop()


async def test_decode_speed_follows_the_finals_once_the_window_holds_enough_audio(tmp_path, model_path):
    """After start the speed is the finals' own: decode seconds over audio seconds of the finals in
    the window (so longer or shorter utterances, or other work on the box, move the cap)."""
    own = RecognizerPool(model_path, size=1, threads=1)  # its own pool: only this test's finals
    own.start()
    srv = await start_server(tmp_path / "data", own, **{"capacity.legs_per_context": "0", "capacity.window_s": "3600"})
    try:
        t = own.final_timing(3600)
        assert t.speed_source == "calibration" and t.decode_s_per_audio_s == own.calibrated_speed, t
        for _ in range(8):  # 10 s of final audio: 3-4 sentences
            await _speak_one_final(srv.url)
            if own.final_timing(3600).speed_source == "finals":
                break
        recent = list(own._recent_finals)
        h = srv.service.admission.headroom()
        assert h.speed_source == "finals", h
        assert h.decode_s_per_audio_s == pytest.approx(sum(r[2] for r in recent) / sum(r[3] for r in recent)), h
        assert h.decode_s_per_audio_s != own.calibrated_speed
    finally:
        await srv.stop()
        own.close()
