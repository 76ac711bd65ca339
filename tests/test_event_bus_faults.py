"""Redis away and back: at start the node refuses to run (one line, non-zero exit); while running,
live sessions go on, /healthz says degraded, and after Redis returns (same port, empty) the other
node's dashboard gets the outage's events and the later ones, with no restart."""

from __future__ import annotations

import asyncio
import os
import sys

import aiohttp
import numpy as np

from bench import corpus
from bridge.client.stream import StreamClient
from tests.redisd import RedisServer, free_port
from tests.serving import API_KEY, start_server
from tests.test_events_api import AUTH, WAIT, finals, next_final, read_until_ended, ws_base
from tests.test_service_process import ROOT
from tests.test_stream_api import EN, SR, send_paced, sil, speech, text_of


async def health(http: aiohttp.ClientSession, srv) -> dict:
    async with http.get(srv.url + "/healthz") as r:
        return await r.json()


async def metric(http: aiohttp.ClientSession, srv, name: str) -> float:
    async with http.get(srv.url + "/metrics") as r:
        text = await r.text()
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


async def health_until(http: aiohttp.ClientSession, srv, status: str) -> dict:
    """Poll /healthz until its status is `status` (WAIT is a hang guard, not a speed bound)."""
    async with asyncio.timeout(WAIT):
        while True:
            h = await health(http, srv)
            if h["status"] == status:
                return h
            await asyncio.sleep(0.05)


async def test_serve_with_redis_down_exits_with_one_line(tmp_path):
    port = free_port()  # nothing listens here
    env = {**os.environ, "CALLBRIDGE_API_KEYS": API_KEY, "CALLBRIDGE_SIP_ENABLED": "false",
           "CALLBRIDGE_LOGGING_FORMAT": "json", "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "serve", "--data-dir", str(tmp_path / "data"), "--http-port",
        str(free_port()), "--bus-url", f"redis://:s3cret@127.0.0.1:{port}/0", cwd=str(ROOT), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    text = err.decode()
    errors = [line for line in text.splitlines() if line.startswith("callbridge: error:")]
    assert proc.returncode == 1, text
    assert len(errors) == 1 and errors[0].startswith("callbridge: error: cannot start: cannot reach the event bus (bus.url, Redis):")
    assert f"127.0.0.1:{port}" in errors[0] and "Traceback" not in text and "s3cret" not in text + out.decode()
    assert "listening" not in out.decode()


async def test_redis_stopped_and_restarted_under_a_live_stream(tmp_path, pool, pg_server):
    redis = RedisServer()
    redis.start()
    db = pg_server.new_database()
    a = b = None
    try:
        ov = {"storage.url": db, "bus.url": redis.url, "credits.usage_interval_s": "0.5"}
        a = await start_server(tmp_path / "data_a", pool, **ov)
        b = await start_server(tmp_path / "data_b", pool, **ov)
        async with aiohttp.ClientSession() as http:
            bus = (await health(http, a))["bus"]
            assert (bus["url"], bus["connected"], bus["buffered"]) == (redis.url, True, 0)
            async with http.ws_connect(f"{ws_base(b)}/v1/events", headers=AUTH) as on_b, \
                    StreamClient(a.url, api_key=API_KEY) as s:
                it = s.__aiter__()
                await send_paced(s, np.concatenate([sil(0.3), speech(EN[0]), sil(1.2)]).tobytes(), SR * 2)
                got = await next_final(it)
                await asyncio.to_thread(redis.stop)  # SIGTERM by PID, under the live session (the loop runs on)
                down = await health_until(http, a, "degraded")
                assert down["bus"]["connected"] is False and down["disk"]["status"] == "ok"
                assert await metric(http, a, "callbridge_bus_connected") == 0
                # the session keeps transcribing and its finals keep coming, while A buffers them
                await send_paced(s, np.concatenate([speech(EN[1]), sil(1.2)]).tobytes(), SR * 2)
                got += await next_final(it)
                assert (await health(http, a))["bus"]["buffered"] > 0
                await asyncio.to_thread(redis.start)  # same port, empty
                outages = (await health_until(http, a, "ok"))["bus"]["disconnects"]
                await health_until(http, b, "ok")
                await send_paced(s, np.concatenate([speech(EN[0]), sil(1.2)]).tobytes(), SR * 2)
                await s.end()
                got += [ev async for ev in it]
                seen_on_b = await read_until_ended(on_b, s.job_id)
            async with asyncio.timeout(WAIT):  # B has every event: A's writer gets its last reply soon
                while (after := await health(http, a))["bus"]["buffered"]:
                    await asyncio.sleep(0.05)
            assert await metric(http, a, "callbridge_bus_connected") == 1
        stream_finals = finals(got)
        assert s.completed is not None and len(stream_finals) >= 3
        assert corpus.wer(" ".join([EN[0], EN[1], EN[0]]), text_of(stream_finals)) < 0.25
        # B saw the whole call: before, during (flushed on reconnection) and after the outage, in order
        assert [e["text"] for e in finals(seen_on_b)] == [e["text"] for e in stream_finals]
        assert [e["seq"] for e in seen_on_b] == sorted({e["seq"] for e in seen_on_b})
        assert seen_on_b[0]["type"] == "call_started" and seen_on_b[-1]["type"] == "call_ended"
        assert after["bus"]["buffered"] == 0 and after["bus"]["dropped"] == 0
        assert after["bus"]["disconnects"] == outages >= 1  # no flap after recovery
    finally:
        for srv in (a, b):
            if srv is not None:
                await srv.stop()
        redis.close()
