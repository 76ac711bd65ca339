"""Logging: JSON lines carry job_id inside bind_job (also across tasks), console is key=value."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
import structlog

from bridge.logs import bind_job, configure_logging, get_logger


@pytest.fixture
def out():
    """A stream to log to; afterwards the global logging setup is put back as it was."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    yield stream
    structlog.contextvars.clear_contextvars()
    for h in [h for h in root.handlers if getattr(h, "_callbridge_handler", False)]:
        root.removeHandler(h)
    root.setLevel(level)
    structlog.reset_defaults()


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_with_job_id_inside_bind_job_only(out):
    configure_logging("json", stream=out)
    log = get_logger("test.logs")

    async def worker():
        await asyncio.sleep(0)
        log.info("in_task", n=2)

    async def main():
        log.info("before")
        with bind_job("job_x", leg="caller"):
            log.info("inside", n=1)
            logging.getLogger("some.lib").warning("stdlib %s", "line")
            await asyncio.create_task(worker())
        log.info("after")

    asyncio.run(main())
    lines = _lines(out)
    by_event = {l["event"]: l for l in lines}
    assert set(by_event) == {"before", "inside", "stdlib line", "in_task", "after"}
    for ev in ("inside", "stdlib line", "in_task"):
        assert by_event[ev]["job_id"] == "job_x" and by_event[ev]["leg"] == "caller"
    for ev in ("before", "after"):
        assert "job_id" not in by_event[ev]
    inside = by_event["inside"]
    assert inside["level"] == "info" and inside["n"] == 1 and inside["logger"] == "test.logs"
    assert inside["timestamp"].endswith("Z") and "T" in inside["timestamp"]
    assert by_event["stdlib line"]["level"] == "warning"
    assert by_event["stdlib line"]["logger"] == "some.lib"


def test_concurrent_jobs_do_not_mix(out):
    configure_logging("json", stream=out)
    log = get_logger("test.logs")

    async def job(jid):
        with bind_job(jid):
            for i in range(3):
                log.info("step", i=i, expect=jid)
                await asyncio.sleep(0)

    async def main():
        await asyncio.gather(job("a"), job("b"))

    asyncio.run(main())
    lines = _lines(out)
    assert len(lines) == 6
    assert all(l["job_id"] == l["expect"] for l in lines)


def test_level_filters(out):
    configure_logging("json", "warning", stream=out)
    log = get_logger("test.logs")
    log.info("hidden")
    logging.getLogger("lib").info("hidden too")
    log.warning("shown")
    assert [l["event"] for l in _lines(out)] == ["shown"]


def test_exception_rendered_in_json(out):
    configure_logging("json", stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("t").exception("failed")
    (line,) = _lines(out)
    assert line["level"] == "error" and "RuntimeError: boom" in line["exception"]


def test_console_renders_key_value(out):
    configure_logging("console", stream=out)
    with bind_job("job_y"):
        get_logger("t").info("hello", http_port=8080)
    text = out.getvalue()
    assert "hello" in text and "http_port=8080" in text and "job_id=job_y" in text
    assert "\x1b[" not in text  # no colour codes when the stream is not a terminal
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_reconfigure_replaces_handler(out):
    configure_logging("json", stream=io.StringIO())
    configure_logging("json", stream=out)
    get_logger("t").info("once")
    assert len(_lines(out)) == 1
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_callbridge_handler", False)]
    assert len(ours) == 1


def test_bad_arguments(out):
    with pytest.raises(ValueError):
        configure_logging("xml", stream=io.StringIO())
    with pytest.raises(ValueError):
        configure_logging("json", "loud", stream=io.StringIO())
