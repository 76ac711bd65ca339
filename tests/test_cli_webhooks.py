"""`callbridge webhooks ...` and `WebhooksClient` against the real service, a real receiver on
loopback and a real stream session (the delivery machinery itself is tested in test_webhooks.py)."""

from __future__ import annotations

import asyncio
import json
import re
import time

from bridge.cli import main
from bridge.client.rest import WebhooksClient
from tests.serving import API_KEY, OTHER_KEY, start_server
from tests.test_stream_api import EN
from tests.test_webhooks import FAST_RETRY, stream_speech
from tests.webhook_receiver import ALLOW_LOOPBACK, Receiver


def cli(argv: list[str]) -> int:
    """`callbridge ARGV` as the console script runs it (argparse's own errors exit too)."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


async def run_cli(*argv: str) -> int:
    """The handlers call asyncio.run, so they run in a worker thread while this loop serves them."""
    return await asyncio.to_thread(cli, list(argv))


# The in-process service logs through structlog's default printer, into the same captured streams.
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[\w+ *\] .*\n?", re.MULTILINE)


class Output:
    """What the CLI printed since the last read, without the service's log lines."""

    def __init__(self, capsys) -> None:
        self.capsys = capsys

    def read(self) -> tuple[str, str]:
        got = self.capsys.readouterr()
        return _LOG_LINE.sub("", got.out), _LOG_LINE.sub("", got.err)

    @property
    def out(self) -> str:
        return self.read()[0]

    @property
    def err(self) -> str:
        return self.read()[1]


def one_line_error(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("callbridge: error:"), err
    return err


async def test_cli_lifecycle_create_test_update_deliveries_redeliver_delete(tmp_path, pool, capsys, storage):
    """On each storage backend (the `storage` fixture): the CLI reads and changes the store."""
    output = Output(capsys)
    rx = await Receiver().start()
    # deliveries to a failing receiver go dead after 1 s, so redelivery has something to do
    srv = await start_server(tmp_path / "data", pool, **{**FAST_RETRY, "webhooks.retry_period_s": "1", **storage})
    conn = ["--url", srv.url, "--api-key", API_KEY]
    try:
        assert await run_cli("webhooks", "create", rx.url, "--events", "call_started,final",
                             "--sources", "stream,webrtc", "--description", "crm", *conn) == 0
        out = output.out
        hook_id = re.search(r"\bwh_[0-9a-f]{16}\b", out).group(0)
        secret = re.search(r"\bwhsec_\S+", out).group(0)
        assert out.count(secret) == 1 and "not shown again" in out
        assert "events       call_started, final" in out and "sources      stream, webrtc" in out
        assert "circuit      closed" in out

        assert await run_cli("webhooks", "list", *conn) == 0
        out = output.out
        lines = out.splitlines()
        assert lines[0].split() == ["ID", "STATE", "EVENTS", "SOURCES", "URL", "DESCRIPTION"]
        assert lines[1].split() == [hook_id, "on", "call_started,final", "stream,webrtc", rx.url, "crm"]
        assert secret not in out
        assert await run_cli("webhooks", "show", hook_id, "--json", *conn) == 0
        shown = json.loads(output.out)
        assert "secret" not in shown and shown["secret_hint"] == "…" + secret[-4:] and shown["enabled"] is True

        # test: a signed ping now; the secret printed at create is the one that signs it
        assert await run_cli("webhooks", "test", hook_id, *conn) == 0
        assert output.out.startswith("delivered ping evt_")
        assert [h.event["type"] for h in rx.hits] == ["ping"] and rx.hits[0].verifies(secret)
        rx.status = 500
        assert await run_cli("webhooks", "test", hook_id, *conn) == 1
        err = one_line_error(output.err)
        assert "not delivered" in err and "HTTP 500" in err
        assert "receiver says no" not in err  # a ping reports the status, never the receiver's body
        assert await run_cli("webhooks", "test", hook_id, "--json", *conn) == 1
        assert json.loads(output.out)["http_status"] == 500

        # update: new events, sources back to all, pause and resume, a new secret shown once
        assert await run_cli("webhooks", "update", hook_id, "--events", "final,call_ended", "--sources", "all",
                             "--disable", "--json", *conn) == 0
        upd = json.loads(output.out)
        assert (upd["events"], upd["sources"], upd["enabled"]) == (["final", "call_ended"], [], False)
        assert "secret" not in upd
        new_secret = "rotated-secret-0123456789"
        assert await run_cli("webhooks", "update", hook_id, "--enable", "--secret", new_secret, *conn) == 0
        out = output.out
        assert out.count(new_secret) == 1 and "not shown again" in out and f"{hook_id}  enabled" in out

        # a real session while the receiver fails: its deliveries go dead
        job_id, got = await stream_speech(srv, EN[:1])
        want = sum(e["type"] == "final" for e in got) + 1  # its finals and the call_ended
        assert want >= 2
        async with WebhooksClient(srv.url, API_KEY) as c:
            deadline = time.monotonic() + 30
            while len(dead := (await c.deliveries(hook_id, status="dead"))["deliveries"]) < want:
                assert time.monotonic() < deadline, "deliveries never went dead"
                await asyncio.sleep(0.3)
        assert await run_cli("webhooks", "deliveries", hook_id, *conn) == 0
        lines = output.out.splitlines()
        assert lines[0].split()[:5] == ["ID", "STATUS", "TYPE", "JOB", "ATTEMPTS"]
        assert [ln.split()[0] for ln in lines[1:]] == [str(d["id"]) for d in dead]
        assert all(ln.split()[1] == "dead" and ln.split()[3] == job_id for ln in lines[1:])
        assert all(ln.endswith("HTTP 500: receiver says no") for ln in lines[1:])

        # redeliver one (the oldest), then every dead one: all arrive, signed with the new secret
        rx.status = 200
        oldest = dead[-1]
        assert await run_cli("webhooks", "redeliver", hook_id, str(oldest["id"]), *conn) == 0
        assert output.out.strip() == f"queued delivery {oldest['id']} again"
        await rx.wait_for(lambda r: len(r.hits) == 2, timeout=30)
        assert rx.hits[1].headers["X-Event-Id"] == oldest["event_id"] and rx.hits[1].verifies(new_secret)
        assert await run_cli("webhooks", "redeliver", hook_id, *conn) == 0
        out = output.out
        assert out.split()[:3] == ["queued", str(want - 1), "dead"] and out.strip().endswith(f"of {hook_id} again")
        await rx.wait_for(lambda r: r.ended(job_id), timeout=30)
        assert len(rx.events(job_id)) == want and all(h.verifies(new_secret) for h in rx.hits[1:])

        assert await run_cli("webhooks", "deliveries", hook_id, "--job", job_id, "--status", "delivered",
                             "--json", *conn) == 0
        log = json.loads(output.out)
        assert sorted(d["id"] for d in log["deliveries"]) == sorted(d["id"] for d in dead) and log["next"] is None
        # --limit stops there and says how to go on; the cursor picks up at the next one
        assert await run_cli("webhooks", "deliveries", hook_id, "--limit", "1", *conn) == 0
        captured_out, captured_err = output.read()
        assert len(captured_out.splitlines()) == 2 and captured_out.splitlines()[1].split()[0] == str(dead[0]["id"])
        cursor = captured_err.split("--cursor ")[1].strip()
        assert await run_cli("webhooks", "deliveries", hook_id, "--limit", "1", "--cursor", cursor, "--json",
                             *conn) == 0
        assert [d["id"] for d in json.loads(output.out)["deliveries"]] == [dead[1]["id"]]
        async with WebhooksClient(srv.url, API_KEY) as c:
            paged = [d["id"] async for d in c.iter_deliveries(hook_id, page_size=1)]
            assert paged == [d["id"] for d in dead]
            assert (await c.delivery(hook_id, oldest["id"]))["status"] == "delivered"

        assert await run_cli("webhooks", "delete", hook_id, *conn) == 0
        assert output.out.strip() == f"deleted {hook_id}"
        assert await run_cli("webhooks", "show", hook_id, *conn) == 2
        assert "404 NOT_FOUND" in one_line_error(output.err)
        assert await run_cli("webhooks", "list", *conn) == 0
        assert output.out.strip() == "no webhooks"
    finally:
        await rx.stop()
        await srv.stop()


async def test_cli_bad_input_and_other_keys(tmp_path, pool, capsys, storage):
    server = await start_server(tmp_path / "data", pool, **ALLOW_LOOPBACK, **storage)
    try:
        await _bad_input_and_other_keys(server, capsys)
    finally:
        await server.stop()


async def _bad_input_and_other_keys(server, capsys):
    output = Output(capsys)
    conn = ["--url", server.url, "--api-key", API_KEY]
    other = ["--url", server.url, "--api-key", OTHER_KEY]
    assert await run_cli("webhooks", "create", "ftp://example.com/hook", *conn) == 2
    err = one_line_error(output.err)
    assert "url must be an absolute http:// or https:// URL" in err and "400 INVALID_REQUEST" in err
    assert await run_cli("webhooks", "create", "http://127.0.0.1:9/hook", "--events", "final,nope", *conn) == 2
    assert "events must be among" in one_line_error(output.err)

    assert await run_cli("webhooks", "create", "http://127.0.0.1:9/hook", "--json", *conn) == 0
    hook = json.loads(output.out)
    assert hook["secret"].startswith("whsec_") and hook["events"] == ["call_started", "final", "dtmf", "call_ended"]
    # another key sees nothing of it and can change nothing
    assert await run_cli("webhooks", "list", *other) == 0
    assert output.out.strip() == "no webhooks"
    for argv in (["show", hook["id"]], ["delete", hook["id"]], ["update", hook["id"], "--disable"],
                 ["test", hook["id"]], ["deliveries", hook["id"]], ["redeliver", hook["id"]]):
        assert await run_cli("webhooks", *argv, *other) == 2, argv
        assert "not found" in one_line_error(output.err), argv
    assert await run_cli("webhooks", "show", hook["id"], "--json", *conn) == 0
    assert json.loads(output.out)["enabled"] is True  # the other key's update did nothing

    # refused before any request
    assert await run_cli("webhooks", "update", hook["id"], *conn) == 2
    assert "nothing to change" in one_line_error(output.err)
    assert await run_cli("webhooks", "deliveries", hook["id"], "--limit", "0", *conn) == 2
    assert "--limit" in one_line_error(output.err)
    assert await run_cli("webhooks", "redeliver", hook["id"], "not-a-number", *conn) == 2
    assert "invalid int value" in output.err
    assert await run_cli("webhooks", "update", hook["id"], "--enable", "--disable", *conn) == 2
    output.read()

    # a ping nobody answers: exit 1, "unreachable" and nothing on why (refused, reset, timeout)
    assert await run_cli("webhooks", "test", hook["id"], *conn) == 1
    err = one_line_error(output.err)
    assert "not delivered: unreachable (" in err and "Connect" not in err and "refused" not in err


def test_cli_unreachable_server(capsys):
    output = Output(capsys)
    assert cli(["webhooks", "list", "--url", "http://127.0.0.1:9", "--api-key", "k", "--timeout", "5"]) == 1
    assert "cannot reach callbridge at http://127.0.0.1:9" in one_line_error(output.err)
