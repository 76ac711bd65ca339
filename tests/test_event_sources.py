"""Events of SIP and WebRTC jobs flow like a stream's: the same bus, the same subscriber socket
(`/v1/events`) and the same signed webhooks. Real pjsua2 caller process, real aiortc peer."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np

from bench import corpus
from bridge.auth import key_id_for
from bridge.client.webrtc import WebRtcClient
from tests.serving import API_KEY, start_server
from tests.test_events_api import read_until_ended
from tests.test_sip_service import CALLER, peer, speech_wav
from tests.test_webrtc import EN, sil, speech, talk
from tests.webhook_receiver import ALLOW_LOOPBACK, Receiver

AUTH = {"Authorization": f"Bearer {API_KEY}"}
SECRET = "test-secret-0123456789abcdef"


async def _watch(server, source: str, rx: Receiver):
    """A webhook (call_started, final, call_ended) and a dashboard socket on `/v1/events?source=`."""
    http = aiohttp.ClientSession()
    async with http.post(f"{server.url}/v1/webhooks", headers=AUTH,
                         json={"url": rx.url, "secret": SECRET, "sources": [source]}) as r:
        assert r.status == 201, await r.text()
    ws = await http.ws_connect(f"ws://127.0.0.1:{server.port}/v1/events?source={source}&types=call_started,final,call_ended",
                               headers=AUTH)
    return http, ws


async def _check(job_id: str, source: str, socket_events: list[dict], rx: Receiver, store) -> list[dict]:
    hooked = rx.events(job_id)
    mine = [e for e in socket_events if e["job_id"] == job_id]
    for evs in (mine, hooked):
        assert evs[0]["type"] == "call_started" and evs[0]["source"] == source
        assert evs[-1]["type"] == "call_ended" and evs[-1]["status"] == "completed"
        assert [e["seq"] for e in evs] == sorted(e["seq"] for e in evs)
    saved = [(g.channel, g.speaker, g.text) for g in await store.segments(job_id)]
    assert saved
    for evs in (mine, hooked):
        assert [(e["channel"], e["speaker"], e["text"]) for e in evs if e["type"] == "final"] == saved
    assert [e["seq"] for e in mine] == [e["seq"] for e in hooked]  # the very same events
    assert all(h.verifies(SECRET) for h in rx.hits)
    return hooked


async def test_sip_call_events_reach_sockets_and_webhooks(tmp_path, pool):
    srv = await start_server(tmp_path / "data", pool, **{"sip.enabled": "true", "server.sip_port": "0",
                                                         "sip.workers": "1", "sip.owner_key": key_id_for(API_KEY),
                                                         **ALLOW_LOOPBACK})
    rx = await Receiver().start()
    http, ws = await _watch(srv, "sip", rx)
    try:
        wav = speech_wav(tmp_path / "caller.wav", CALLER)
        reader = asyncio.ensure_future(read_until_ended(ws))
        rc, _, err = await peer("call", f"sip:support@127.0.0.1:{srv.service.sip.port}", "--play", str(wav),
                                   "--header", "X-Ticket: 4711")
        assert rc == 0, err
        seen = await asyncio.wait_for(reader, 60)
        job_id = seen[0]["job_id"]
        await rx.wait_for(lambda r: r.ended(job_id))
        hooked = await _check(job_id, "sip", seen, rx, srv.service.store)
    finally:
        await ws.close()
        await http.close()
        await rx.stop()
        await srv.stop()
    started = hooked[0]
    assert started["speakers"] == ["caller"] and started["metadata"]["sip"]["headers"]["X-Ticket"] == "4711"
    text = " ".join(e["text"] for e in hooked if e["type"] == "final")
    assert corpus.wer(CALLER, text) < 0.2, text


async def test_webrtc_call_events_reach_sockets_and_webhooks(tmp_path, pool):
    server = await start_server(tmp_path / "data", pool, **ALLOW_LOOPBACK)
    rx = await Receiver().start()
    http, ws = await _watch(server, "webrtc", rx)
    try:
        reader = asyncio.ensure_future(read_until_ended(ws))
        pcm = np.concatenate([sil(0.4), speech(EN[0]), sil(1.0)])
        async with WebRtcClient(server.url, api_key=API_KEY, audio=pcm) as c:
            events = await talk(c, server)
        seen = await asyncio.wait_for(reader, 60)
        await rx.wait_for(lambda r: r.ended(c.job_id))
        hooked = await _check(c.job_id, "webrtc", seen, rx, server.service.store)
    finally:
        await ws.close()
        await http.close()
        await rx.stop()
        await server.stop()
    # the browser's own channel carried the same finals
    assert [e["text"] for e in events if e["type"] == "final"] == [e["text"] for e in hooked if e["type"] == "final"]
    assert corpus.wer(EN[0], " ".join(e["text"] for e in hooked if e["type"] == "final")) < 0.15
