"""The webhook outbox across nodes: two dispatchers (two node ids, each with its own event bus and
its own connection pool) deliver from one real PostgreSQL outbox to real HTTP receivers on
loopback. Each event is delivered by one node, in order per (endpoint, job), under row leases that
run out when a node stalls or dies (bridge/stores/webhooks.py, docs/webhooks.md "Several nodes").
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from bridge.config import load_config
from bridge.events.bus import InProcessBus
from bridge.events.types import Final
from bridge.stores import Stores, open_stores
from bridge.webhooks.dispatcher import WebhookDispatcher
from bridge.webhooks.model import DeliveryStatus, Endpoint
from tests.test_webhooks import SECRET, until
from tests.webhook_receiver import ALLOW_LOOPBACK, Receiver

OWNER = "key_cluster"


class Node:
    """One callbridge node's webhook side: its own bus, store connections and dispatcher."""

    def __init__(self, stores: Stores, dispatcher: WebhookDispatcher) -> None:
        self.stores = stores
        self.webhooks = dispatcher
        self.bus = dispatcher.bus

    def publish(self, job_id: str, n: int, owner: str = OWNER) -> None:
        """`n` finals of `job_id`, published on this node (so this node queues them)."""
        for i in range(n):
            self.bus.publish(job_id, Final(f"{job_id} final {i + 1}", (), 0, "caller", float(i), i + 0.5, True),
                             owner=owner, source="sip")


@asynccontextmanager
async def node(url: str, node_id: str, *, lease_s: float | None = None, **settings: str) -> AsyncIterator[Node]:
    stores = await open_stores(url)
    cfg = load_config({**ALLOW_LOOPBACK, **settings}, env={}).webhooks
    dispatcher = WebhookDispatcher(InProcessBus(), stores.webhooks, stores.jobs, cfg, node_id=node_id,
                                   lease_s=lease_s)
    try:
        await dispatcher.start()
        yield Node(stores, dispatcher)
    finally:
        await dispatcher.stop(grace_s=0.5)
        await stores.close()


async def add_endpoint(url: str, eid: str, target: str, owner: str = OWNER) -> None:
    stores = await open_stores(url)
    try:
        await stores.webhooks.create_endpoint(Endpoint(id=eid, owner=owner, url=target, secret=SECRET,
                                                       events=("final",), created_at=1.0, updated_at=1.0))
    finally:
        await stores.close()


async def all_recorded(node: Node, endpoints: tuple[str, ...], n: int) -> list[Any]:
    """The outbox rows of `endpoints` once `n` of them are recorded delivered (a receiver has a
    POST a moment before the node commits its record)."""
    async def rows() -> list[Any]:
        return [d for eid in endpoints for d in await node.stores.webhooks.list_deliveries(eid, limit=500)]

    async def recorded() -> bool:
        return sum(d.status is DeliveryStatus.DELIVERED for d in await rows()) >= n

    await until(recorded, what=f"{n} deliveries recorded")
    return await rows()


def chains(rx: Receiver) -> dict[tuple[str, str], list[int]]:
    """(endpoint, job) -> the seqs the receiver accepted, in arrival order."""
    out: dict[tuple[str, str], list[int]] = {}
    for h in rx.hits:
        out.setdefault((h.headers["X-Webhook-Id"], h.event["job_id"]), []).append(h.event["seq"])
    return out


@pytest.fixture
def pg_url(pg_server: Any) -> str:
    return pg_server.new_database()


async def test_two_nodes_deliver_every_event_once_in_order_per_chain(pg_url: str) -> None:
    """Both nodes queue events (each its own jobs') and both scan the one outbox at once: every
    (endpoint, job) chain arrives complete, each event once, in order. Without leases both
    nodes attempt the same heads and the receivers get duplicates."""
    rx = await Receiver().start()
    try:
        for eid in ("we_1", "we_2"):
            await add_endpoint(pg_url, eid, rx.url)
        async with node(pg_url, "node-a") as a, node(pg_url, "node-b") as b:
            jobs = {f"job_{i}": (a if i % 2 else b) for i in range(8)}
            for _ in range(2):  # interleaved, so both nodes' writers and scans overlap
                for job, owner in jobs.items():
                    owner.publish(job, 6)
            total = 2 * 6 * len(jobs) * 2
            await rx.wait_for(lambda r: len(r.hits) >= total, timeout=120)
            rows = await all_recorded(a, ("we_1", "we_2"), total)
    finally:
        await rx.stop()
    assert len(rx.hits) == total
    assert len({h.headers["X-Event-Id"] + h.headers["X-Webhook-Id"] for h in rx.hits}) == total  # each once
    got = chains(rx)
    assert set(got) == {(eid, job) for eid in ("we_1", "we_2") for job in jobs}
    assert all(seqs == list(range(1, 13)) for seqs in got.values()), got
    assert len(rows) == total and all(d.status is DeliveryStatus.DELIVERED and d.attempts == 1 for d in rows)
    assert all(h.verifies(SECRET) for h in rx.hits)


async def test_a_stalled_nodes_lease_runs_out_and_its_late_result_is_ignored(pg_url: str) -> None:
    """Node A leases a chain's head and its POST hangs past the lease (a frozen or cut-off node);
    node B takes the row once the lease has run out, delivers it and the rest of the chain in
    order. When A's request finally returns (a 500 here), A's record is refused: the row stays
    as B recorded it, delivered at B's one attempt. The receiver saw that one event twice, with
    the same X-Event-Id: at least once, as documented."""
    rx = await Receiver().start()
    rx.hold = lambda h: not rx.held  # the first request hangs
    try:
        await add_endpoint(pg_url, "we_1", rx.url)
        async with node(pg_url, "node-a", lease_s=1.0, **{"webhooks.timeout_s": "120"}) as a:
            a.publish("job_x", 3)
            await rx.wait_for(lambda r: len(r.held) == 1)
            first = rx.held[0].headers["X-Event-Id"]
            async with node(pg_url, "node-b") as b:
                await rx.wait_for(lambda r: len(r.hits) == 3, timeout=60)  # B: the whole chain
                assert [h.event["seq"] for h in rx.hits] == [1, 2, 3] and rx.hits[0].headers["X-Event-Id"] == first
                rx.status = 500
                rx.released.set()  # A's hanging request is answered now, long after its lease
                await until(lambda: a.webhooks.stats()["in_flight"] == 0, what="A's attempt to end")
                rows = await all_recorded(b, ("we_1",), 3)
    finally:
        await rx.stop()
    assert [(h.headers["X-Event-Id"], h.status) for h in rx.requests][-1] == (first, 500)  # A's, answered last
    assert all(d.status is DeliveryStatus.DELIVERED and d.attempts == 1 and d.last_status == 200 for d in rows), rows
    assert all(d.lease_node is None for d in rows)


async def test_a_slow_chain_on_one_node_does_not_hold_up_another_chain(pg_url: str) -> None:
    """The receiver hangs on one job's events: node A holds that chain's lease for as long as its
    request hangs. Another job's chain of the same endpoint, queued on node B, goes out through B
    meanwhile, while B leaves the leased chain alone (no second attempt of its head)."""
    rx = await Receiver().start()
    rx.hold = lambda h: h.event["job_id"] == "job_slow"
    try:
        await add_endpoint(pg_url, "we_1", rx.url)
        one_slot = {"webhooks.concurrency": "1", "webhooks.timeout_s": "120"}
        async with node(pg_url, "node-a", **one_slot) as a, node(pg_url, "node-b", **one_slot) as b:
            a.publish("job_slow", 2)
            await rx.wait_for(lambda r: len(r.held) == 1)
            b.publish("job_fast", 5)
            await rx.wait_for(lambda r: len(r.hits) == 5, timeout=60)
            assert [h.event["job_id"] for h in rx.hits] == ["job_fast"] * 5 and len(rx.held) == 1
            assert a.webhooks.stats()["in_flight"] == 1  # A is still in its slow attempt
            rx.released.set()
            await rx.wait_for(lambda r: len([h for h in r.hits if h.event["job_id"] == "job_slow"]) == 2)
            rows = await all_recorded(b, ("we_1",), 7)
    finally:
        await rx.stop()
    assert chains(rx) == {("we_1", "job_fast"): [1, 2, 3, 4, 5], ("we_1", "job_slow"): [1, 2]}
    assert len(rx.requests) == 7  # no event was attempted twice
    assert all(d.status is DeliveryStatus.DELIVERED and d.attempts == 1 for d in rows)


async def test_an_endpoint_registered_on_one_node_gets_the_events_of_another_nodes_calls(pg_url: str) -> None:
    """The endpoint table is shared, each dispatcher's copy of it is not: node B, running when
    node A's API registers an endpoint, must start queueing its own calls' events for it (and
    deliver them) within its refresh, not only after a restart."""
    rx = await Receiver().start()
    try:
        async with node(pg_url, "node-a") as a, node(pg_url, "node-b") as b:
            await a.stores.webhooks.create_endpoint(Endpoint(id="we_new", owner=OWNER, url=rx.url, secret=SECRET,
                                                             events=("final",), created_at=1.0, updated_at=1.0))
            await a.webhooks.reload()  # what node A's API does after the write

            async def b_knows() -> bool:
                return "we_new" in b.webhooks._endpoints

            await until(b_knows, what="node B to read the new endpoint")
            b.publish("job_on_b", 3)
            await rx.wait_for(lambda r: len(r.hits) >= 3, timeout=60)
    finally:
        await rx.stop()
    assert [h.event["seq"] for h in rx.hits] == [1, 2, 3] and {h.event["job_id"] for h in rx.hits} == {"job_on_b"}
