"""The HTTP front door: Debian nginx with the shipped config/nginx/callbridge.conf (ports
substituted, nothing else changed) in front of two real `callbridge serve` processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from bench import corpus
from bridge.client.stream import StreamClient
from tests.serving import API_KEY
from tests.test_service_process import Serve, free_port
from tests.test_stream_api import EN, SR, collect, finals, send_paced, sil, speech, text_of

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "config" / "nginx" / "callbridge.conf"
pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="Debian nginx not installed")
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WS_LOCATIONS = ("= /v1/transcription/stream", "= /v1/events", "~ ^/v1/calls/[^/]+/events$")


def local_config(tmp: Path, port: int, node_ports: list[int]) -> Path:
    """A main nginx.conf (foreground, files under `tmp`) including the shipped file with this
    test's listen port and node list substituted."""
    text = CONF.read_text()
    servers = re.findall(r"^    server 127\.0\.0\.1:\d+ (.*);$", text, re.M)
    assert servers and len(set(servers)) == 1, "the shipped upstream lists its nodes one per line"
    text = re.sub(r"^    server 127\.0\.0\.1:\d+ .*;\n", "", text, flags=re.M)
    text = text.replace("    least_conn;\n", "    least_conn;\n" + "".join(
        f"    server 127.0.0.1:{p} {servers[0]};\n" for p in node_ports))
    assert "    listen 80;\n" in text
    text = text.replace("    listen 80;\n", f"    listen 127.0.0.1:{port};\n")
    (tmp / "callbridge.conf").write_text(text)
    main = tmp / "nginx.conf"
    main.write_text(f"daemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log info;\n"
                    "events { worker_connections 256; }\n"
                    "http {\n  log_format up '$request_uri $status addr=$upstream_addr status=$upstream_status';\n"
                    f"  access_log {tmp}/access.log up;\n  client_body_temp_path {tmp}/body;\n"
                    f"  proxy_temp_path {tmp}/proxy;\n  include {tmp}/callbridge.conf;\n}}\n")
    return main


def test_shipped_config_parses_and_keeps_websockets_open_past_3_hours(tmp_path):
    """`nginx -t` accepts the file; every WebSocket location upgrades and waits past 3 h
    (limits.max_duration_s) between reads and writes, so the proxy never ends a session first."""
    import subprocess

    main = local_config(tmp_path, free_port(), [free_port(), free_port()])
    out = subprocess.run(["nginx", "-t", "-c", str(main)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    text = CONF.read_text()
    assert "proxy_set_header Upgrade $http_upgrade;" in text and "proxy_set_header Connection $callbridge_connection;" in text
    for loc in WS_LOCATIONS:
        body = text.split(f"location {loc} {{", 1)[1].split("}", 1)[0]
        for directive in ("proxy_read_timeout", "proxy_send_timeout"):
            seconds = int(re.search(rf"{directive} (\d+)s;", body).group(1))
            assert seconds > 10800, (loc, directive, seconds)
        assert "http_503" in body, loc  # a starting or draining node's refusal goes to the next node


@contextlib.asynccontextmanager
async def nginx(tmp: Path, node_ports: list[int]):
    port = free_port()
    main = local_config(tmp, port, node_ports)
    proc = await asyncio.create_subprocess_exec("nginx", "-c", str(main), stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                assert proc.returncode is None, (tmp / "error.log").read_text()[-2000:]
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url + "/healthz") as r:
                        if r.status == 200:
                            break
                assert time.monotonic() < deadline, "nginx did not answer /healthz in 30 s"
                await asyncio.sleep(0.1)
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then the master exits
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


async def stream_jobs(node: Serve) -> dict[str, dict]:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(node.url + "/v1/jobs") as r:
            assert r.status == 200
            return {j["id"]: j for j in (await r.json())["jobs"]}


async def test_streams_spread_over_both_nodes_a_stopped_node_is_skipped_events_stay_open(tmp_path):
    pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(1.2)])
    env = {"CALLBRIDGE_API_KEYS": API_KEY}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with Serve(tmp_path / "a" / "data", env) as a, Serve(tmp_path / "b" / "data", env) as b, \
            nginx(tmp_path, [a.port, b.port]) as front:
        ws_front = front.replace("http", "ws", 1)
        async with aiohttp.ClientSession(headers=AUTH) as http:
            events = await http.ws_connect(ws_front + "/v1/events", heartbeat=None)
            seen: list[dict] = []

            async def watch() -> None:
                async for msg in events:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        seen.append(json.loads(msg.data))

            watcher = asyncio.create_task(watch())

            async def run(clients: list[StreamClient]) -> list[tuple[str, list[dict]]]:
                async def one(s: StreamClient) -> tuple[str, list[dict]]:
                    await send_paced(s, pcm.tobytes(), SR * 2)
                    await s.end()
                    return s.job_id, await collect(s)

                return await asyncio.gather(*(one(s) for s in clients))

            # three sessions open at once: least_conn puts them on both nodes (the event socket
            # holds one connection to one of them)
            async with contextlib.AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(StreamClient(front, api_key=API_KEY, sample_rate=SR))
                           for _ in range(3)]
                results = await run(clients)
            for job_id, evs in results:
                assert corpus.wer(EN[0], text_of(finals(evs))) < 0.15, (job_id, text_of(finals(evs)))
                assert evs[-1]["type"] == "completed"
            on_a, on_b = await stream_jobs(a), await stream_jobs(b)
            ids = {job_id for job_id, _ in results}
            assert ids == set(on_a) | set(on_b) and on_a and on_b, (list(on_a), list(on_b))
            assert all(j["status"] == "completed" for j in [*on_a.values(), *on_b.values()])

            # the event socket, through the proxy, saw its node's calls live, finals included
            ev_node, other = (a, b) if set(on_a) & {e.get("job_id") for e in seen} else (b, a)
            watched = set(on_a if ev_node is a else on_b)

            async def saw_all_ended() -> bool:
                return {e["job_id"] for e in seen if e["type"] == "call_ended"} >= watched

            await _until(saw_all_ended, 30, "call_ended of the event node's calls on /v1/events")
            assert {e["job_id"] for e in seen if e["type"] == "final"} >= watched

            # the other node stops (SIGTERM: drains, exits); new sessions all go to the one left
            assert other.proc is not None
            other.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(other.proc.wait(), 60) == 0
            for _ in range(2):
                async with StreamClient(front, api_key=API_KEY, sample_rate=SR) as s:
                    ((job_id, evs),) = await run([s])
                assert corpus.wer(EN[0], text_of(finals(evs))) < 0.15, text_of(finals(evs))
                assert job_id in await stream_jobs(ev_node)

                async def ended(job_id: str = job_id) -> bool:
                    return any(e["type"] == "call_ended" and e["job_id"] == job_id for e in seen)

                await _until(ended, 30, "call_ended of a call after the stop on the same event socket")
            assert not events.closed and not watcher.done()
            await events.close()
            await watcher


async def _until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.05)


async def test_behind_nginx_the_auth_backoff_counts_each_client_not_the_proxy(tmp_path):
    """With nginx in `server.trusted_proxies`, a client that keeps sending bad credentials is
    throttled (429) by its own address, from X-Forwarded-For, while another client behind the
    same proxy still gets in; addresses the client itself put left of it are not believed.
    (Without the setting every client is nginx's one address: one guesser blocks everyone.)"""
    (tmp_path / "a").mkdir()
    env = {"CALLBRIDGE_API_KEYS": API_KEY, "CALLBRIDGE_TRUSTED_PROXIES": "127.0.0.1/32",
           "CALLBRIDGE_AUTH_FAILURES_BEFORE_BACKOFF": "2"}
    async with Serve(tmp_path / "a" / "data", env) as a, nginx(tmp_path, [a.port]) as front:
        async with aiohttp.ClientSession() as http:
            async def jobs(key: str, client: str) -> int:
                # the client's own proxy chain: nginx appends the address it saw (here loopback)
                async with http.get(front + "/v1/jobs", headers={"Authorization": f"Bearer {key}",
                                                                 "X-Forwarded-For": client}) as r:
                    return r.status

            bad = "cbk_test_not_a_valid_key_0000000000"
            codes = [await jobs(bad, "198.51.100.7") for _ in range(4)]
            assert codes[:2] == [401, 401] and codes[-1] == 429, codes
            # the same client naming another address to the left of its own is still itself
            assert await jobs(API_KEY, "203.0.113.9, 198.51.100.7") == 429
            # another client behind the same proxy is not blocked
            assert await jobs(API_KEY, "198.51.100.8") == 200
            assert await jobs(bad, "198.51.100.8") == 401


async def test_a_draining_node_gets_no_new_sessions(tmp_path):
    """A node draining (SIGTERM while it still finalizes a long session's backlog) answers 503
    before the upgrade; nginx moves each new session to the other node (its access log shows
    the draining node's 503 followed by the other's 101), and the drained session completes."""
    env = {"CALLBRIDGE_API_KEYS": API_KEY}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    short = np.concatenate([sil(0.3), speech(EN[0]), sil(1.2)])
    backlog = np.concatenate([np.concatenate([speech(EN[i % 2]), sil(0.8)]) for i in range(12)]).tobytes()
    async with Serve(tmp_path / "a" / "data", env) as a, Serve(tmp_path / "b" / "data", env) as b, \
            nginx(tmp_path, [a.port, b.port]) as front:
        # a long session straight to node B, sent faster than B decodes it: B's drain has to
        # finalize all of it, so B stays draining (and listening) for a while
        async with StreamClient(b.url, api_key=API_KEY, sample_rate=SR) as long:
            for i in range(0, len(backlog), 64000):
                await long.send_audio(backlog[i:i + 64000])
            assert b.proc is not None
            b.proc.send_signal(signal.SIGTERM)

            async def b_draining() -> bool:
                async with aiohttp.ClientSession() as http, http.get(b.url + "/healthz") as r:
                    return r.status == 503 and (await r.json())["status"] == "draining"

            await _until(b_draining, 30, "node B draining")
            jobs = []
            for _ in range(3):
                async with StreamClient(front, api_key=API_KEY, sample_rate=SR) as s:
                    await send_paced(s, short.tobytes(), SR * 2, speed=None)
                    await s.end()
                    evs = await collect(s)
                assert corpus.wer(EN[0], text_of(finals(evs))) < 0.15, text_of(finals(evs))
                jobs.append(s.job_id)
            assert await b_draining(), "node B stopped draining before the sessions were done"
            assert set(jobs) <= set(await stream_jobs(a))
            log = (tmp_path / "access.log").read_text()
            tried_b = [ln for ln in log.splitlines() if ln.startswith("/v1/transcription/stream")
                       and f"127.0.0.1:{b.port}" in ln]
            # "addr=B, A status=503, 101": B refused the handshake, A took it
            assert tried_b and all(ln.endswith(f"addr=127.0.0.1:{b.port}, 127.0.0.1:{a.port} status=503, 101")
                                   for ln in tried_b), log
            evs = [e async for e in long]
        assert evs[-1]["type"] == "completed" and evs[-1]["server_shutdown"], evs[-1]
        assert await asyncio.wait_for(b.proc.wait(), 60) == 0
