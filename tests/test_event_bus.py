"""The bus contract, for the in-process bus and the Redis bus alike: per-job seq, routing, taps
before subscribers, bounded queues, the `local` flag; then what only a shared bus does: two nodes
on one Redis see each other's events in order per job, and each node its own exactly once."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from bridge.config import BUS_SCHEMES, ConfigError, add_config_flags, config_from_args, load_config
from bridge.events.bus import Envelope, EventBus, InProcessBus
from bridge.events.redisbus import STREAM, BusUnavailable, RedisBus
from bridge.events.registry import BUSES, BusConfigError, open_bus
from bridge.events.types import (EVENT_CLASSES, CallEnded, CallStarted, Dtmf, Final, Partial, Usage, Word,
                                 event_from_dict)
from bridge.events.wire import decode_envelope, encode_envelope
from tests.redisd import RedisServer, free_port

WAIT = 30.0  # hang guard on any one wait


def _final(text: str, start: float) -> Final:
    return Final(text, (), 0, "caller", start, start + 1.0, True)


async def until(pred: Callable[[], bool], what: str) -> None:
    """Wait for a condition another task makes true; WAIT is a hang guard, not a speed bound."""
    async with asyncio.timeout(WAIT):
        while not pred():
            await asyncio.sleep(0.01)


async def take(sub, n: int) -> list[Envelope]:
    return [await asyncio.wait_for(sub.__anext__(), WAIT) for _ in range(n)]


@pytest.fixture(params=["memory", "redis"])
async def bus(request) -> AsyncIterator[EventBus]:
    if request.param == "memory":
        yield InProcessBus()
        return
    b = RedisBus(request.getfixturevalue("redis_server").url)
    await b.start()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def two_nodes(redis_server) -> AsyncIterator[tuple[RedisBus, RedisBus]]:
    a, b = RedisBus(redis_server.url, node_id="node_a"), RedisBus(redis_server.url, node_id="node_b")
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


# --------------------------------------------------------------------------- the contract, both buses


async def test_seq_per_job_routing_and_a_broken_tap_stops_nothing(bus):
    seen_by_tap: list[tuple[str, int]] = []

    def broken(env) -> None:
        raise RuntimeError("sink down")

    bus.add_tap(broken)
    bus.add_tap(lambda env: seen_by_tap.append((env.job_id, env.seq)))
    one, every = bus.subscribe("job_a"), bus.subscribe(None)
    a1 = bus.publish("job_a", _final("hello", 0.0), owner="key_1", source="sip")
    b1 = bus.publish("job_b", _final("other", 0.0), owner="key_2", source="stream")
    a2 = bus.publish("job_a", CallEnded("completed", 1.0, 3.7), owner="key_1", source="sip")
    assert (a1.seq, b1.seq, a2.seq) == (1, 1, 2)
    assert (a1.owner, a1.source, b1.owner) == ("key_1", "sip", "key_2")
    assert a1.node_id == bus.node_id != ""
    assert seen_by_tap == [("job_a", 1), ("job_b", 1), ("job_a", 2)]  # the broken tap did not stop it
    assert [e.seq for e in [await one.__anext__(), await one.__anext__()]] == [1, 2]
    got = await take(every, 3)
    assert [(e.job_id, e.seq) for e in got] == [("job_a", 1), ("job_b", 1), ("job_a", 2)]
    assert got[0].to_dict()["job_id"] == "job_a" and got[0].to_dict()["seq"] == 1
    # after call_ended a job's numbering starts over (a new job id in practice)
    assert bus.publish("job_a", Usage(0.0, 0.0)).seq == 1


async def test_full_subscriber_drops_partials_then_is_cut_off(bus):
    sub = bus.subscribe("j", maxsize=2)
    bus.publish("j", _final("one", 0.0))
    bus.publish("j", _final("two", 1.0))
    bus.publish("j", Partial("thr", 0, "caller", 2.0, 2.5))  # no room: dropped, still subscribed
    assert sub.dropped_partials == 1 and not sub.overflowed
    bus.publish("j", _final("three", 2.0))  # a final that does not fit: cut off
    assert sub.overflowed and sub.closed
    assert [e.event.text async for e in sub] == ["one", "two"]


async def test_local_subscription_sees_this_process_publishes(bus):
    local, every = bus.subscribe(None, local=True), bus.subscribe(None)
    bus.publish("j", _final("mine", 0.0))
    assert [e.event.text for e in await take(local, 1)] == ["mine"]
    assert [e.event.text for e in await take(every, 1)] == ["mine"]


# --------------------------------------------------------------------------- events as bytes


EVERY_EVENT = [
    Partial("I would", 1, "agent", 0.30049, 1.2),
    Final("I would like", (Word("I", 0.3, 0.4, 0.98123), Word("would", 0.4, 0.61234, 0.5)), 0, "caller", 0.3,
          3.14159, True, "en", 0.87654),
    Final("cut at the cap", (), 1, "agent", 15.0, 30.0, False),
    Usage(5.0004, 18.3333),
    CallStarted("sip", ("caller", "agent"), {"language": "en"}, {"from": "sip:a@b", "headers": {"X-A": "1"}}),
    CallEnded("failed", 12.4, 45.47, {"code": "STORAGE_FULL", "message": "disk full"}),
    CallEnded("completed", 1.0, 3.7),
    Dtmf("5", 0, "caller", 2.5, 160),
]


@pytest.mark.parametrize("event", EVERY_EVENT, ids=lambda e: type(e).__name__)
def test_every_event_type_round_trips(event):
    env = Envelope("job_x", 7, event, "key_1", "sip", "node_a")
    back = decode_envelope(encode_envelope(env))
    assert back == env and type(back.event) is type(event)  # unrounded: the very event
    assert event_from_dict(event.to_dict()).to_dict() == event.to_dict()  # the client-facing form too


def test_every_event_type_is_covered_and_junk_is_refused():
    assert {type(e) for e in EVERY_EVENT} == set(EVENT_CLASSES.values())
    for junk in (b"not json", b"[]", b'{"job_id": "j"}', b'{"job_id": "j", "seq": 1, "event": {"type": "nope"}}',
                 b'{"job_id": "j", "seq": 1, "event": {"type": "usage", "bogus": 1}}'):
        with pytest.raises(ValueError):
            decode_envelope(junk)


# --------------------------------------------------------------------------- the registry


def test_registry_opens_a_bus_by_url_scheme(redis_server):
    assert set(BUSES) == set(BUS_SCHEMES)
    assert type(open_bus("")) is InProcessBus and type(open_bus("memory://")) is InProcessBus
    assert type(open_bus(redis_server.url)) is RedisBus and type(open_bus("rediss://h:1/0")) is RedisBus
    with pytest.raises(BusConfigError, match="redis://"):
        open_bus("nats://h:4222")


async def test_unreachable_redis_at_start_is_one_clear_error():
    bus = RedisBus(f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    with pytest.raises(BusUnavailable) as e:
        await bus.start()
    await bus.close()
    msg = str(e.value)
    assert msg.startswith("cannot reach the event bus (bus.url, Redis):") and "\n" not in msg
    assert "hunter2" not in msg


# --------------------------------------------------------------------------- two nodes on one Redis


async def test_two_nodes_see_each_other_in_order_per_job_and_their_own_once(two_nodes):
    a, b = two_nodes
    a_all, b_all = a.subscribe(None), b.subscribe(None)
    b_job, b_local = b.subscribe("job_a1"), b.subscribe(None, local=True)
    remote_taps: list[tuple[str, int]] = []
    local_taps: list[tuple[str, int]] = []
    b.add_tap(lambda env: remote_taps.append((env.job_id, env.seq)), remote=True)
    b.add_tap(lambda env: local_taps.append((env.job_id, env.seq)))
    n = 300
    published = []
    for i in range(n):  # two jobs on A, interleaved, partials among finals
        for job in ("job_a1", "job_a2"):
            ev = Partial(f"p{i}", 0, "caller", i, i + 0.5) if i % 3 else _final(f"f{i}", i)
            published.append(a.publish(job, ev, owner="key_1", source="stream"))
    published.append(a.publish("job_a1", CallEnded("completed", n, 1.0), owner="key_1", source="stream"))
    mine = b.publish("job_b1", _final("from b", 0.0), owner="key_2", source="sip")

    got = await take(b_all, len(published) + 1)
    from_a = [e for e in got if e.node_id == "node_a"]
    assert from_a == published  # equal envelopes: the same events, seqs, owner, source, node
    assert [e for e in got if e.node_id == "node_b"] == [mine]  # its own: once, from the publish
    for job in ("job_a1", "job_a2"):
        seqs = [e.seq for e in from_a if e.job_id == job]
        assert seqs == list(range(1, len(seqs) + 1))
    assert [e.seq for e in await take(b_job, n + 1)] == list(range(1, n + 2))
    assert [e.job_id for e in await take(b_local, 1)] == ["job_b1"]  # local: B's own only
    assert sorted(remote_taps) == sorted([(e.job_id, e.seq) for e in published] + [("job_b1", 1)])  # remote too
    assert local_taps == [("job_b1", 1)]
    # A's own events reached A once (at publish), although A's reader read them back from Redis
    await until(lambda: a.received == 1 and b.received == len(published) and a.sent == len(published),
                "both readers caught up, A's writer has its last reply")
    assert [(e.node_id, e.job_id, e.seq) for e in await take(a_all, len(published) + 1)] == \
        [(e.node_id, e.job_id, e.seq) for e in published] + [("node_b", "job_b1", 1)]
    assert a_all._q.qsize() == 0 and b_local._q.qsize() == 0
    assert a.health().connected and a.health().buffered == 0


async def test_a_resent_entry_is_delivered_once(two_nodes, redis_server):
    """A batch retried after the connection broke mid-way lands twice on the stream."""
    a, b = two_nodes
    sub = b.subscribe("job_r")
    env = a.publish("job_r", _final("once", 0.0))
    await until(lambda: a.sent == 1, "sent")
    await a._redis.xadd(STREAM, {"e": encode_envelope(env)})  # the resend
    await a._redis.xadd(STREAM, {"e": b"garbage"})  # not ours: skipped, counted, nothing else lost
    later = a.publish("job_r", _final("twice?", 1.0))
    assert [e.seq for e in await take(sub, 2)] == [1, 2] and later.seq == 2
    await until(lambda: b.unreadable == 1, "garbage seen")
    assert b.resends_skipped == 1 and sub._q.qsize() == 0


# --------------------------------------------------------------------------- Redis down and back


async def test_redis_down_buffers_in_order_and_recovers_without_restart():
    srv = RedisServer()
    srv.start()
    a, b = RedisBus(srv.url, node_id="node_a"), RedisBus(srv.url, node_id="node_b")
    try:
        await a.start()
        await b.start()
        b_sub, a_local = b.subscribe("job_x"), a.subscribe("job_x")
        a.publish("job_x", _final("before", 0.0))
        assert (await take(b_sub, 1))[0].event.text == "before"
        await asyncio.to_thread(srv.stop)  # SIGTERM by PID (the loop runs on)
        await until(lambda: not a.health().connected and not b.health().connected, "both see Redis gone")
        during = [a.publish("job_x", _final(f"during {i}", i + 1.0)) for i in range(50)]
        assert [e.event.text for e in await take(a_local, 51)][1:] == [e.event.text for e in during]  # local: at once
        assert a.health().buffered == 50 and a.health().dropped == 0
        await asyncio.to_thread(srv.start)  # same port, empty (no persistence)
        await until(lambda: a.health().connected and b.health().connected, "both reconnected")
        outages = a.disconnects  # 1, or more if a reconnection reached the server while it shut down
        after = a.publish("job_x", CallEnded("completed", 60.0, 1.0))
        got = await take(b_sub, 51)
        assert got == during + [after]  # the outage's events, in order, then the later one
        await until(lambda: a.health().buffered == 0, "A's writer has its last reply")
        assert a.disconnects == outages >= 1 and a.sent == 52  # no flap after recovery
    finally:
        await a.close()
        await b.close()
        srv.close()


async def test_full_buffer_drops_partials_first_then_the_oldest():
    bus = RedisBus(f"redis://127.0.0.1:{free_port()}/0", max_buffer=4)  # never started: nothing is sent
    try:
        bus.publish("j", _final("f1", 0.0))
        bus.publish("j", Partial("p1", 0, "caller", 1.0, 1.5))
        bus.publish("j", _final("f2", 1.0))
        bus.publish("j", Partial("p2", 0, "caller", 2.0, 2.5))
        assert bus.health().buffered == 4 and bus.health().dropped == 0
        bus.publish("j", Partial("p3", 0, "caller", 3.0, 3.5))  # full: a new partial is dropped
        assert (bus.dropped, bus.dropped_partials) == (1, 1)
        bus.publish("j", _final("f3", 3.0))  # full: the buffered partials make room
        assert (bus.dropped, bus.dropped_partials) == (3, 3)
        bus.publish("j", _final("f4", 4.0))
        bus.publish("j", _final("f5", 5.0))  # full of finals: the oldest goes
        assert (bus.dropped, bus.dropped_partials) == (4, 3)
        assert [e.event.text for e in bus._buffer] == ["f2", "f3", "f4", "f5"]
        h = bus.health().to_dict()
        assert h["connected"] is False and h["buffered"] == 4 and h["dropped"] == 4 and h["dropped_partials"] == 3
    finally:
        await bus.close()


def test_bus_url_from_file_env_and_flag_checked_and_masked(tmp_path):
    assert load_config(env={}).bus.url == ""  # the in-process bus by default
    f = tmp_path / "cb.toml"
    f.write_text('[bus]\nurl = "redis://10.0.0.5:6379/0"\nbuffer_events = 500\n')
    c = load_config(env={}, config_file=str(f))
    assert (c.bus.url, c.bus.buffer_events) == ("redis://10.0.0.5:6379/0", 500)
    c = load_config(env={"CALLBRIDGE_BUS_URL": "redis://:pw@h:1/2"}, config_file=str(f))
    assert c.bus.url == "redis://:pw@h:1/2" and c.to_dict()["bus"]["url"] == "redis://:****@h:1/2"
    p = argparse.ArgumentParser()
    add_config_flags(p)
    c = config_from_args(p.parse_args(["--bus-url", "rediss://u:pw@h:1/0"]), env={"CALLBRIDGE_BUS_URL": "redis://x"})
    assert c.bus.url == "rediss://u:pw@h:1/0"  # the flag wins
    with pytest.raises(ConfigError, match=r"bus\.url has unknown scheme 'nats'.*\(from flag --bus-url\)"):
        config_from_args(p.parse_args(["--bus-url", "nats://h:4222"]), env={})
    with pytest.raises(ConfigError, match=r"bus\.url must look like redis://.*CALLBRIDGE_BUS_URL"):
        load_config(env={"CALLBRIDGE_BUS_URL": "localhost:6379"})


async def test_a_job_taken_over_continues_the_dead_nodes_numbering(two_nodes):
    """Node A dies mid-call; node B, which read A's events off Redis, publishes the job's end (the
    take-over, bridge/cluster/recovery.py) with the next seq, not 1: a dashboard that saw A's
    events up to seq N drops anything not above N (bridge/api/events.py)."""
    a, b = two_nodes
    b_all = b.subscribe(None)
    for i in range(5):
        a.publish("job_dying", _final(f"f{i}", float(i)), owner="key_1", source="stream")
    await take(b_all, 5)
    end = b.publish("job_dying", CallEnded("failed", 5.0, 1.0), owner="key_1", source="stream")
    assert (end.seq, end.node_id) == (6, "node_b")
    assert b.publish("job_other", _final("x", 0.0), owner="key_1", source="stream").seq == 1  # its own from 1
