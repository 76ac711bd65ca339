"""The in-process bus: per-job seq, routing attributes, taps before subscribers, bounded queues."""

from __future__ import annotations

import asyncio

from bridge.events.bus import EventBus, InProcessBus
from bridge.events.types import CallEnded, Final, Partial, Usage


def _final(text: str, start: float) -> Final:
    return Final(text, (), 0, "caller", start, start + 1.0, True)


async def test_seq_per_job_routing_and_a_broken_tap_stops_nothing():
    bus: EventBus = InProcessBus()
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
    assert seen_by_tap == [("job_a", 1), ("job_b", 1), ("job_a", 2)]  # the broken tap did not stop it
    assert [e.seq for e in [await one.__anext__(), await one.__anext__()]] == [1, 2]
    got = [await asyncio.wait_for(every.__anext__(), 1) for _ in range(3)]
    assert [(e.job_id, e.seq) for e in got] == [("job_a", 1), ("job_b", 1), ("job_a", 2)]
    assert got[0].to_dict()["job_id"] == "job_a" and got[0].to_dict()["seq"] == 1
    # after call_ended a job's numbering starts over (a new job id in practice)
    assert bus.publish("job_a", Usage(0.0, 0.0)).seq == 1


async def test_full_subscriber_drops_partials_then_is_cut_off():
    bus = InProcessBus()
    sub = bus.subscribe("j", maxsize=2)
    bus.publish("j", _final("one", 0.0))
    bus.publish("j", _final("two", 1.0))
    bus.publish("j", Partial("thr", 0, "caller", 2.0, 2.5))  # no room: dropped, still subscribed
    assert sub.dropped_partials == 1 and not sub.overflowed
    bus.publish("j", _final("three", 2.0))  # a final that does not fit: cut off
    assert sub.overflowed and sub.closed
    assert [e.event.text async for e in sub] == ["one", "two"]
