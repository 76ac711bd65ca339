"""Where key-owned webhooks may POST (bridge/webhooks/targets.py): the real service, real
receivers on loopback, and the real HTTP client the dispatcher delivers with."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver

from bridge.webhooks.targets import GuardedResolver, TargetBlocked, TargetPolicy
from tests.serving import API_KEY, start_server
from tests.test_stream_api import EN
from tests.test_webhooks import AUTH, SECRET, create_hook, stream_speech, until
from tests.webhook_receiver import ALLOW_LOOPBACK, HangingReceiver, Receiver

INTERNAL = ["http://127.0.0.1:8080/hook", "http://127.1/hook", "http://10.1.2.3/hook", "http://192.168.1.10/hook",
            "http://172.16.0.1/hook", "http://169.254.169.254/latest/meta-data/", "http://100.64.0.1/hook",
            "http://0.0.0.0:8080/hook", "http://224.0.0.1/hook", "http://[::1]:8080/hook",
            "http://[::ffff:127.0.0.1]/hook", "http://[::ffff:a9fe:a9fe]/hook", "http://[fe80::1]/hook",
            "http://[fc00::1]/hook", "http://[::]/hook", "http://[2002:7f00:1::]/hook", "http://[64:ff9b::7f00:1]/hook",
            "http://localhost:8080/hook"]
PUBLIC = "http://93.184.216.34/hook"  # only registered, never connected to: the test machine is offline


async def post(http: aiohttp.ClientSession, url: str, body: dict, method: str = "post") -> tuple[int, dict]:
    async with http.request(method, url, json=body, headers=AUTH) as r:
        return r.status, await r.json()


async def test_key_endpoints_to_internal_addresses_are_refused_at_registration(server):
    async with aiohttp.ClientSession() as http:
        base = f"{server.url}/v1/webhooks"
        for url in INTERNAL:
            status, body = await post(http, base, {"url": url})
            assert status == 400 and body["error"]["code"] == "INVALID_REQUEST", (url, body)
            assert "is not allowed" in body["error"]["message"] and "allow_private_targets" in body["error"]["message"]
        status, public = await post(http, base, {"url": PUBLIC})
        assert status == 201, public
        for url in ("http://127.0.0.1:8080/hook", "http://localhost/hook"):  # nor by changing the URL
            status, body = await post(http, f"{base}/{public['id']}", {"url": url}, "patch")
            assert status == 400 and "is not allowed" in body["error"]["message"], body
        status, body = await post(http, base, {"url": "http://no-such-host.invalid/hook"})
        assert status == 400 and "does not resolve" in body["error"]["message"]
        async with http.get(base, headers=AUTH) as r:
            assert [w["url"] for w in (await r.json())["webhooks"]] == [PUBLIC]


async def test_operator_allowances(tmp_path, pool):
    """allow_private_targets opens every address; allowed_target_networks only the ones named."""
    srv = await start_server(tmp_path / "a", pool, **{"webhooks.allowed_target_networks": "10.0.0.0/8,fd00::/8"})
    try:
        async with aiohttp.ClientSession() as http:
            for url, want in [("http://10.1.2.3/hook", 201), ("http://[fd00::5]/hook", 201),
                              ("http://127.0.0.1/hook", 400), ("http://192.168.1.10/hook", 400)]:
                status, body = await post(http, f"{srv.url}/v1/webhooks", {"url": url})
                assert status == want, (url, body)
    finally:
        await srv.stop()
    srv = await start_server(tmp_path / "b", pool, **ALLOW_LOOPBACK)
    try:
        async with aiohttp.ClientSession() as http:
            for url in INTERNAL:
                status, body = await post(http, f"{srv.url}/v1/webhooks", {"url": url})
                assert status == 201, (url, body)
    finally:
        await srv.stop()


async def test_not_delivered_where_the_url_resolves_to_a_blocked_address_at_delivery(tmp_path, pool, storage):
    """Endpoints registered while loopback was allowed (an IP literal and a name that resolves
    to loopback), then the operator turns the allowance off: the next job's events are not sent
    to them (the receiver is up and gets nothing), the delivery log says why, and an operator
    endpoint from the config on the same receiver still gets everything. On each storage
    backend: the endpoints and their delivery log outlive the restart in the store."""
    data = tmp_path / "data"
    rx = await Receiver().start()
    srv = await start_server(data, pool, **ALLOW_LOOPBACK, **storage)
    try:
        async with aiohttp.ClientSession() as http:
            literal = await create_hook(http, srv, rx.url, secret=SECRET, events=["call_ended"])
            named = await create_hook(http, srv, rx.url.replace("127.0.0.1", "localhost"), secret=SECRET,
                                      events=["call_ended"])
            async with http.post(f"{srv.url}/v1/webhooks/{named['id']}/test", headers=AUTH) as r:
                assert (await r.json())["delivered"] is True  # allowed: localhost reaches the receiver
    finally:
        await srv.stop()
    rx.requests.clear()
    rx.hits.clear()
    operator = json.dumps([{"name": "ops", "url": rx.url, "secret": SECRET, "events": ["call_ended"]}])
    srv = await start_server(data, pool, **{"webhooks.endpoints": operator, "webhooks.backoff_initial_s": "0.3",
                                            **storage})
    try:
        job_id, _ = await stream_speech(srv, EN[:1])
        await rx.wait_for(lambda r: r.ended(job_id))
        async with aiohttp.ClientSession() as http:
            async def tried() -> list[dict]:
                rows = []
                for hook in (literal, named):
                    async with http.get(f"{srv.url}/v1/webhooks/{hook['id']}/deliveries", headers=AUTH) as r:
                        rows += (await r.json())["deliveries"]
                return rows

            await until(lambda: _all_attempted(tried), what="attempts to the blocked endpoints")
            rows = await tried()
            async with http.post(f"{srv.url}/v1/webhooks/{literal['id']}/test", headers=AUTH) as r:
                ping = await r.json()
    finally:
        await srv.stop()
        await rx.stop()
    assert len(rows) == 2 and all(d["status"] == "pending" and d["delivered_at"] is None for d in rows)
    assert all(d["last_error"].startswith("address not allowed: 127.0.0.1 is a loopback address")
               or d["last_error"].startswith("address not allowed: ::1 is a loopback address") for d in rows), rows
    assert {h.headers["X-Webhook-Id"] for h in rx.requests} == {"wh_cfg_ops"}  # nothing reached the receiver
    assert ping == {**ping, "delivered": False, "http_status": None, "error": "unreachable"}


async def _all_attempted(tried) -> bool:
    rows = await tried()
    return len(rows) == 2 and all(d["attempts"] >= 1 for d in rows)


class _Flipping(AbstractResolver):
    """A name server whose answer changes between lookups (DNS rebinding): the only stand-in in
    these tests, because no real resolver on a loopback-only machine can be made to do that."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.lookups = 0

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[dict]:
        ip = self.answers[min(self.lookups, len(self.answers) - 1)]
        self.lookups += 1
        return [{"hostname": host, "host": ip, "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


async def test_rebinding_name_is_checked_on_every_connection():
    """A name that first resolves to an allowed address and then to loopback: the client the
    dispatcher delivers with connects only to what its resolver checked, so the second
    connection is refused before it is made, and the receiver on 127.0.0.1 never sees it."""
    allowed = await Receiver().start()
    allowed_site = await _rebind(allowed, "127.0.0.2")  # the "public" address of this test
    target = await Receiver(port=allowed.port).start()  # 127.0.0.1, same port
    policy = TargetPolicy.from_config(False, ["127.0.0.2/32"])
    flipping = _Flipping(["127.0.0.2", "127.0.0.1"])
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy, flipping), use_dns_cache=False,
                                     force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            url = f"http://crm.rebind.test:{allowed.port}/hook"
            async with http.post(url, data=b"{}") as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientConnectorError) as caught:
                async with http.post(url, data=b"{}"):
                    pass
        assert isinstance(caught.value.os_error, TargetBlocked)
        assert "127.0.0.1 is a loopback address" in str(caught.value.os_error)
    finally:
        await allowed_site.cleanup()
        await target.stop()
    assert flipping.lookups == 2 and len(allowed.requests) == 1 and target.requests == []


async def _rebind(rx: Receiver, host: str):
    """Serve `rx`'s app on another loopback address (127.0.0.2) instead of 127.0.0.1."""
    from aiohttp import web

    await rx.stop()
    app = web.Application()
    app.router.add_post("/hook", rx._hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, rx.port).start()
    return runner


async def _resetting_server() -> tuple[asyncio.Server, int]:
    """Accepts, then closes with a TCP reset (SO_LINGER 0)."""
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_ping_reports_the_status_only(tmp_path, pool):
    """A 500 with a body, a refused port, a reset and a hang: the ping says `HTTP 500` for the first
    and the same `unreachable` for the rest, without the body or the kind of failure."""
    rx = await Receiver().start()
    rx.status = 500  # answers "receiver says no"
    hanging = await HangingReceiver().start()
    resetting, reset_port = await _resetting_server()
    refused = Receiver()  # never started
    srv = await start_server(tmp_path / "data", pool, **{**ALLOW_LOOPBACK, "webhooks.timeout_s": "1"})
    answers = {}
    try:
        async with aiohttp.ClientSession() as http:
            for name, url in [("status", rx.url), ("refused", refused.url), ("hang", hanging.url),
                              ("reset", f"http://127.0.0.1:{reset_port}/hook")]:
                hook = await create_hook(http, srv, url, secret=SECRET)
                async with http.post(f"{srv.url}/v1/webhooks/{hook['id']}/test", headers=AUTH) as r:
                    assert r.status == 200
                    answers[name] = await r.json()
    finally:
        await srv.stop()
        await rx.stop()
        await hanging.stop()
        resetting.close()
        await resetting.wait_closed()
    shown = {name: (a["delivered"], a["http_status"], a["error"]) for name, a in answers.items()}
    assert shown == {"status": (False, 500, "HTTP 500"), "refused": (False, None, "unreachable"),
                     "hang": (False, None, "unreachable"), "reset": (False, None, "unreachable")}
    assert all(set(a) == {"delivered", "event_id", "http_status", "error", "ms"} for a in answers.values())
    assert len(rx.requests) == 1 and hanging.connections == 1  # each was really tried
    assert API_KEY not in json.dumps(answers)


def test_allowed_networks_setting_is_checked():
    from bridge.config import ConfigError, load_config

    cfg = load_config({"webhooks.allowed_target_networks": "10.20.0.0/16, fd00::/8"}, env={})
    assert cfg.webhooks.allowed_target_networks == ("10.20.0.0/16", "fd00::/8")
    policy = TargetPolicy.from_config(False, cfg.webhooks.allowed_target_networks)
    assert policy.refusal("10.20.3.4") is None and policy.refusal("10.21.0.1") == "10.21.0.1 is a private address"
    assert policy.refusal("::ffff:10.20.3.4") is None  # the mapped form of an allowed address
    assert policy.refusal("64:ff9b::808:808") is None  # NAT64 of a public address (an IPv6-only host)
    assert policy.refusal("64:ff9b::a9fe:a9fe") == "169.254.169.254 is a link-local address"
    with pytest.raises(ConfigError, match=r"webhooks.allowed_target_networks .*'10.0.0.0/33'.*environment"):
        load_config(env={"CALLBRIDGE_WEBHOOKS_ALLOWED_TARGET_NETWORKS": "10.0.0.0/33"})
