"""The storage contract: every registered backend (bridge.stores.registry.BACKENDS) behaves the same
through the async interfaces the service uses: jobs and segments, keys, credits, temporary tokens,
webhook endpoints and the outbox. Today that is SQLite on a real file in tmp_path; a new backend
adds its test URL to BACKEND_URLS and runs this whole file.

Also here: the URL is the only thing that picks a backend (an unknown scheme is a config error
before anything opens), the default URL reads the data files where the service has always kept
them, and nothing outside bridge/stores opens a database.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bridge.config import Config, ConfigError, StorageConfig, load_config
from bridge.jobs.model import Job, JobSource, JobStatus, new_job_id
from bridge.stores import (
    BACKENDS,
    DB_NAME,
    InsufficientCredits,
    JobStore,
    KeyNotFound,
    KeyStore,
    StoreNotFound,
    Stores,
    StoreUnavailable,
    TokenRefused,
    WebhookStore,
    open_stores,
    store_url,
)
from bridge.stores.keys import hash_secret
from bridge.stores.sqlite.keys import SqliteKeyStore
from bridge.webhooks.model import DeliveryStatus, Endpoint

ROOT = Path(__file__).resolve().parent.parent

# scheme -> a fresh, empty database for one test (from its tmp_path, or a fixture it asks for)
BACKEND_URLS: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {
    "sqlite": lambda request, tmp: f"sqlite://{tmp / 'contract.db'}",
    # a real PostgreSQL 15 server for the session (tests/pg.py), a new database per test
    "postgresql": lambda request, tmp: request.getfixturevalue("pg_server").new_database(),
}


def test_every_registered_backend_runs_the_contract() -> None:
    """Every backend (an opener; one may serve several schemes, as postgresql:// and postgres://)
    runs the contract through at least one URL."""
    assert set(BACKEND_URLS) <= set(BACKENDS)
    assert {BACKENDS[s] for s in BACKEND_URLS} == set(BACKENDS.values()), \
        "add the new backend's test URL to BACKEND_URLS"


@pytest.fixture(params=sorted(BACKEND_URLS))
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return BACKEND_URLS[request.param](request, tmp_path)


@pytest.fixture
async def stores(url: str) -> AsyncIterator[Stores]:
    s = await open_stores(url)
    yield s
    await s.close()


@pytest.mark.parametrize("interface,attr", [(JobStore, "jobs"), (KeyStore, "keys"), (WebhookStore, "webhooks")])
async def test_the_backend_has_every_method_of_the_interface_as_a_coroutine(stores: Stores, interface: type,
                                                                             attr: str) -> None:
    impl = getattr(stores, attr)
    for name, method in inspect.getmembers(interface, inspect.isfunction):
        if name.startswith("_"):
            continue
        mine = getattr(impl, name, None)
        assert mine is not None and inspect.iscoroutinefunction(mine), f"{type(impl).__name__}.{name}"
        want = [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()][1:]
        got = [(p.name, p.kind, p.default) for p in inspect.signature(mine).parameters.values()]
        assert got == want, f"{type(impl).__name__}.{name}{inspect.signature(mine)}"


def final(text: str, start: float, end: float, channel: int = 0, speaker: str = "caller") -> dict:
    return {"text": text, "start": start, "end": end, "channel": channel, "speaker": speaker,
            "words": [{"word": text, "start": start, "end": end, "confidence": 0.9}], "speech_final": True,
            "language": "en", "confidence": 0.9}


# --------------------------------------------------------------------------- jobs


async def test_jobs_create_get_update_finish_delete(stores: Stores) -> None:
    jobs = stores.jobs
    job = await jobs.create_job(Job(id=new_job_id(), owner="key_a", source=JobSource.SIP,
                                    speakers=["caller", "agent"], config={"language": "en"}))
    got = await jobs.get_job(job.id)
    assert got == job and got.status is JobStatus.LIVE
    assert await jobs.get_job(job.id, owner="key_a") == job
    assert await jobs.get_job(job.id, owner="key_b") is None  # another owner sees nothing
    assert await jobs.get_job("job_missing") is None

    await jobs.update_job(job.id, metadata={"dtmf": ["1"]}, duration_s=2.5, audio_path="/r/x.wav")
    with pytest.raises(ValueError):
        await jobs.update_job(job.id, status="completed")  # status only through finish_job
    with pytest.raises(KeyError):
        await jobs.update_job("job_missing", metadata={})
    await jobs.finish_job(job.id, JobStatus.FAILED, 3.0, error={"code": "INTERNAL", "message": "x"}, ended_at=99.0)
    with pytest.raises(KeyError):
        await jobs.finish_job("job_missing", JobStatus.COMPLETED, 1.0)
    await jobs.finish_job(job.id, JobStatus.COMPLETED, 9.0)  # a late end (a taken-over node's call): no effect
    got = await jobs.get_job(job.id)
    assert (got.status, got.duration_s, got.ended_at, got.error) == (JobStatus.FAILED, 3.0, 99.0,
                                                                      {"code": "INTERNAL", "message": "x"})
    assert (got.metadata, got.audio_path, got.speakers) == ({"dtmf": ["1"]}, "/r/x.wav", ["caller", "agent"])

    await jobs.add_segment(job.id, final("hello", 0.5, 1.0))
    deleted = await jobs.delete_job(job.id)
    assert deleted is not None and deleted.id == job.id
    assert await jobs.get_job(job.id) is None and await jobs.segments(job.id) == []
    assert await jobs.delete_job(job.id) is None


async def test_jobs_list_filters_and_pages_newest_first(stores: Stores) -> None:
    jobs = stores.jobs
    made = []
    for i in range(5):
        made.append(await jobs.create_job(Job(id=new_job_id(), owner="key_a", created_at=1000.0 + i,
                                              source=JobSource.SIP if i % 2 else JobSource.STREAM)))
    await jobs.create_job(Job(id=new_job_id(), owner="key_b", created_at=1002.5))
    await jobs.finish_job(made[0].id, JobStatus.COMPLETED, 1.0)

    page, cursor = await jobs.list_jobs(owner="key_a", limit=2)
    assert [j.id for j in page] == [made[4].id, made[3].id] and cursor
    late = await jobs.create_job(Job(id=new_job_id(), owner="key_a", created_at=2000.0))  # pages stay stable
    rest = []
    while cursor:
        more, cursor = await jobs.list_jobs(owner="key_a", limit=2, cursor=cursor)
        rest += more
    assert [j.id for j in rest] == [made[2].id, made[1].id, made[0].id]
    assert [j.id for j in (await jobs.list_jobs(owner="key_a", source="sip"))[0]] == [made[3].id, made[1].id]
    assert [j.id for j in (await jobs.list_jobs(owner="key_a", status=JobStatus.COMPLETED))[0]] == [made[0].id]
    assert [j.id for j in (await jobs.list_jobs(owner="key_a", since=1003.0))[0]] == [late.id, made[4].id, made[3].id]
    assert len((await jobs.list_jobs())[0]) == 7  # every owner's
    with pytest.raises(ValueError):
        await jobs.list_jobs(cursor="not-a-cursor")


async def test_segments_ordered_edited_and_relabelled(stores: Stores) -> None:
    jobs = stores.jobs
    job = await jobs.create_job(Job(id=new_job_id(), owner="k", speakers=["caller", "agent"]))
    b = await jobs.add_segment(job.id, final("second", 2.0, 3.0, 1, "agent"))
    a = await jobs.add_segment(job.id, final("first", 1.0, 1.5))
    assert b.id < a.id and (b.seq, a.seq) == (0, 1)  # ids and seq increase in insertion order
    segs = await jobs.segments(job.id)
    assert [g.text for g in segs] == ["first", "second"]  # by start
    assert segs[0].words == [{"word": "first", "start": 1.0, "end": 1.5, "confidence": 0.9}]
    assert (segs[0].language, segs[0].confidence, segs[0].speech_final) == ("en", 0.9, True)

    edited = await jobs.edit_segment(job.id, a.id, text="First!")
    assert (edited.text, edited.original_text, edited.edited_at is not None) == ("First!", "first", True)
    again = await jobs.edit_segment(job.id, a.id, text="1st", speaker="agent")
    assert (again.text, again.original_text, again.speaker, again.original_speaker) == ("1st", "first", "agent",
                                                                                        "caller")
    with pytest.raises(KeyError):
        await jobs.edit_segment(job.id, 10**9, text="x")
    assert await jobs.rename_speaker(job.id, "agent", "Bob") == 2
    assert (await jobs.get_job(job.id)).speakers == ["caller", "Bob"]
    assert {g.speaker for g in await jobs.segments(job.id)} == {"Bob"}
    with pytest.raises(KeyError):
        await jobs.rename_speaker("job_missing", "a", "b")


async def test_a_final_written_twice_is_stored_once(stores: Stores) -> None:
    """A write retried after its first try committed but its answer was lost (bridge/backlog.py)."""
    jobs = stores.jobs
    job = await jobs.create_job(Job(id=new_job_id(), owner="k", speakers=["caller", "agent"]))
    first = await jobs.add_segment(job.id, final("hello there", 1.0, 1.75))
    again = await jobs.add_segment(job.id, final("hello there", 1.0, 1.75))
    other_leg = await jobs.add_segment(job.id, final("hello there", 1.0, 1.75, 1, "agent"))
    assert (again.id, again.seq) == (first.id, first.seq) and other_leg.id != first.id
    assert [(g.channel, g.text) for g in await jobs.segments(job.id)] == [(0, "hello there"), (1, "hello there")]


async def test_live_jobs_are_failed_at_startup_with_their_segments_kept(stores: Stores) -> None:
    jobs = stores.jobs
    live = await jobs.create_job(Job(id=new_job_id(), owner="k"))
    done = await jobs.create_job(Job(id=new_job_id(), owner="k"))
    await jobs.finish_job(done.id, JobStatus.COMPLETED, 1.0)
    await jobs.add_segment(live.id, final("kept", 0.0, 4.5))
    assert await jobs.fail_live_jobs("crashed") == [live.id]
    got = await jobs.get_job(live.id)
    assert got.status is JobStatus.FAILED and got.error == {"code": "INTERNAL", "message": "crashed"}
    assert got.duration_s == 4.5 and [g.text for g in await jobs.segments(live.id)] == ["kept"]
    assert (await jobs.get_job(done.id)).status is JobStatus.COMPLETED
    assert await jobs.fail_live_jobs("again") == []


async def test_what_was_written_is_there_after_reopening(url: str) -> None:
    first = await open_stores(url)
    job = await first.jobs.create_job(Job(id=new_job_id(), owner="k"))
    await first.jobs.add_segment(job.id, final("durable", 0.0, 1.0))
    key, secret = await first.keys.create_key(credits=10)
    await first.close()
    second = await open_stores(url, create=False)
    try:
        assert [g.text for g in await second.jobs.segments(job.id)] == ["durable"]
        assert (await second.keys.verify_key(secret)).id == key.id
    finally:
        await second.close()


# --------------------------------------------------------------------------- keys and credits


async def test_keys_created_verified_listed_revoked(stores: Stores) -> None:
    keys = stores.keys
    key, secret = await keys.create_key(name="alice", credits=5)
    assert secret.startswith("cbk_") and key.balance == 5 and not key.revoked
    assert await keys.verify_key(secret) == key and await keys.verify_key(secret + "x") is None
    assert await keys.get_key(key.id) == key and await keys.get_key("key_missing") is None
    await keys.ensure_keys(["config-key-0123456789", "config-key-0123456789"])
    assert [k.name for k in await keys.list_keys()] == ["alice", "config"]
    assert await keys.active_key_count() == 2
    with pytest.raises(ValueError):
        await keys.ensure_keys(["short"])
    with pytest.raises(ValueError):
        await keys.create_key(credits=-1)
    assert await keys.revoke(key.id) is True and await keys.revoke(key.id) is False
    assert (await keys.verify_key(secret)).revoked and await keys.active_key_count() == 1
    await keys.ensure_keys(["config-key-0123456789"])  # a re-import never un-revokes anything
    assert await keys.active_key_count() == 1


async def test_credits_adjusted_and_unlimited(stores: Stores) -> None:
    keys = stores.keys
    key, _ = await keys.create_key()
    with pytest.raises(ValueError):
        await keys.add_credits(key.id, -1)  # unlimited: nothing to take from
    assert await keys.add_credits(key.id, 50) == 50  # now metered
    assert await keys.add_credits(key.id, -20) == 30
    with pytest.raises(ValueError):
        await keys.add_credits(key.id, -31)
    with pytest.raises(KeyNotFound):
        await keys.add_credits("key_missing", 1)
    await keys.set_unlimited(key.id)
    assert (await keys.get_key(key.id)).balance is None
    with pytest.raises(KeyNotFound):
        await keys.set_unlimited("key_missing")


async def test_reserve_settle_and_refund(stores: Stores) -> None:
    keys = stores.keys
    key, _ = await keys.create_key(credits=1000)
    await keys.reserve(key.id, "job_a", 600)
    with pytest.raises(InsufficientCredits) as e:
        await keys.reserve(key.id, "job_b", 401)
    assert (e.value.balance, e.value.needed) == (400, 401)
    with pytest.raises(ValueError):
        await keys.reserve(key.id, "job_a", 1)  # one reservation per job
    await keys.reserve(key.id, "job_b", 400)
    k = await keys.get_key(key.id)
    assert (k.balance, k.reserved, k.available) == (1000, 1000, 0)
    assert await keys.open_reservations() == {"job_a": 600, "job_b": 400}

    await keys.settle("job_a", 100)  # charged what it used; the other 500 held go back
    await keys.settle("job_a", 100)  # idempotent
    await keys.settle("job_b", 0)  # a session that never opened: the whole hold is refunded
    await keys.settle("job_never", 7)  # no reservation: nothing happens
    k = await keys.get_key(key.id)
    assert (k.balance, k.reserved) == (900, 0) and await keys.open_reservations() == {}
    await keys.reserve(key.id, "job_c", 900)
    await keys.settle("job_c", 5000)  # more than the balance: floored at 0
    assert (await keys.get_key(key.id)).balance == 0

    unlimited, _ = await keys.create_key()
    await keys.reserve(unlimited.id, "job_d", 10**9)
    await keys.reserve("jwt:alice", "job_e", 10**9)
    assert await keys.open_reservations() == {}


async def test_concurrent_reservations_never_overdraw(url: str) -> None:
    """Two openings of one database (the service and `callbridge keys`, or two service
    processes) race to reserve: the check and the hold are one transaction."""
    a, b = await open_stores(url), await open_stores(url)
    try:
        key, _ = await a.keys.create_key(credits=100)
        results = await asyncio.gather(*((a if i % 2 else b).keys.reserve(key.id, f"job_{i}", 30)
                                         for i in range(8)), return_exceptions=True)
        won = [r for r in results if r is None]
        assert len(won) == 3 and all(isinstance(r, InsufficientCredits) for r in results if r is not None)
        assert (await b.keys.get_key(key.id)).reserved == 90
    finally:
        await a.close()
        await b.close()


async def test_orphaned_reservations_settled_from_the_jobs_usage(stores: Stores) -> None:
    keys = stores.keys
    key, _ = await keys.create_key(credits=100)
    await keys.reserve(key.id, "job_x", 60)
    await keys.reserve(key.id, "job_y", 30)
    used = {"job_x": 7, "job_y": 0}

    async def used_for(job_id: str) -> int:
        return used[job_id]

    assert await keys.settle_orphans(used_for) == 2
    assert ((await keys.get_key(key.id)).balance, await keys.open_reservations()) == (93, {})
    assert await keys.settle_orphans(used_for) == 0


# --------------------------------------------------------------------------- temporary tokens


async def test_tokens_single_use_checked_released_and_refused(stores: Stores) -> None:
    keys = stores.keys
    key, _ = await keys.create_key()
    token, expires_at = await keys.mint_temp_token(key.id, 60)
    assert token.startswith("cbt_") and expires_at > 0
    assert await keys.consume_temp_token(token, spend=False) == key.id  # only checked
    assert await keys.consume_temp_token(token) == key.id
    with pytest.raises(TokenRefused) as e:
        await keys.consume_temp_token(token)
    assert e.value.code == "TOKEN_REUSED"
    await keys.release_temp_token(hash_secret(token))  # its session never opened: usable again
    assert await keys.consume_temp_token(token) == key.id

    with pytest.raises(TokenRefused) as e:
        await keys.consume_temp_token("cbt_" + "x" * 43)
    assert e.value.code == "INVALID_CREDENTIALS"
    other, _ = await keys.mint_temp_token(key.id, 60)
    await keys.revoke(key.id)
    with pytest.raises(TokenRefused) as e:
        await keys.consume_temp_token(other)
    assert e.value.code == "KEY_REVOKED"
    with pytest.raises(TokenRefused) as e:
        await keys.mint_temp_token(key.id, 60)
    assert e.value.code == "KEY_REVOKED"
    with pytest.raises(KeyNotFound):
        await keys.mint_temp_token("key_missing", 60)
    with pytest.raises(ValueError):
        await keys.mint_temp_token(key.id, 0)


async def test_a_token_is_won_by_one_of_many_concurrent_handshakes(url: str) -> None:
    a, b = await open_stores(url), await open_stores(url)
    try:
        key, _ = await a.keys.create_key()
        token, _ = await a.keys.mint_temp_token(key.id, 60)
        results = await asyncio.gather(*((a if i % 2 else b).keys.consume_temp_token(token) for i in range(10)),
                                       return_exceptions=True)
        assert results.count(key.id) == 1
        assert all(isinstance(r, TokenRefused) and r.code == "TOKEN_REUSED" for r in results if r != key.id)
    finally:
        await a.close()
        await b.close()


# --------------------------------------------------------------------------- webhook endpoints and the outbox


def endpoint(eid: str, owner: str = "key_a", **kw: object) -> Endpoint:
    return Endpoint(id=eid, owner=owner, url=f"https://hooks.example/{eid}", secret="whsec_" + eid,
                    created_at=kw.pop("created_at", 1.0), updated_at=1.0, **kw)  # type: ignore[arg-type]


async def test_endpoints_crud_and_config_sync(stores: Stores) -> None:
    hooks = stores.webhooks
    e1 = await hooks.create_endpoint(endpoint("we_1", sources=("sip",)))
    await hooks.create_endpoint(endpoint("we_2", owner="key_b", created_at=2.0))
    assert await hooks.get_endpoint("we_1") == e1
    assert await hooks.get_endpoint("we_1", owner="key_b") is None
    assert [e.id for e in await hooks.list_endpoints()] == ["we_1", "we_2"]
    assert [e.id for e in await hooks.list_endpoints("key_a")] == ["we_1"]
    assert await hooks.count_endpoints("key_a") == 1

    up = await hooks.update_endpoint("we_1", url="https://hooks.example/new", events=("final",), enabled=False)
    assert (up.url, up.events, up.enabled, up.sources) == ("https://hooks.example/new", ("final",), False, ("sip",))
    with pytest.raises(ValueError):
        await hooks.update_endpoint("we_1", owner="key_b")
    assert await hooks.delete_endpoint("we_2") is True and await hooks.delete_endpoint("we_2") is False

    await hooks.sync_config_endpoints([endpoint("cfg_a", owner=""), endpoint("cfg_b", owner="")])
    assert {e.id: e.managed_by for e in await hooks.list_endpoints()} == {"we_1": "api", "cfg_a": "config",
                                                                          "cfg_b": "config"}
    await hooks.sync_config_endpoints([endpoint("cfg_b", owner="")])  # cfg_a left the config: disabled, kept
    state = {e.id: e.enabled for e in await hooks.list_endpoints()}
    assert state == {"we_1": False, "cfg_a": False, "cfg_b": True}


async def test_outbox_chains_attempts_redelivery_and_pruning(stores: Stores) -> None:
    hooks = stores.webhooks
    await hooks.create_endpoint(endpoint("we_1"))
    await hooks.create_endpoint(endpoint("we_2", created_at=2.0))
    rows = [("we_1", "job_a", f"evt_{i}", i, "final", f'{{"seq": {i}}}', 10.0 + i) for i in range(1, 4)]
    rows += [("we_1", "job_b", "evt_b1", 1, "final", "{}", 20.0), ("we_2", "job_a", "evt_c1", 1, "final", "{}", 30.0)]
    assert await hooks.enqueue(rows) == 5
    assert await hooks.enqueue([]) == 0

    heads, chains, lease_wait = await hooks.chain_heads(per_endpoint=10, node_id="n1")
    assert chains == 3 and lease_wait is None and [(d.endpoint_id, d.job_id, d.event_id) for d in heads] == [
        ("we_1", "job_a", "evt_1"), ("we_2", "job_a", "evt_c1"), ("we_1", "job_b", "evt_b1")]  # interleaved
    assert len((await hooks.chain_heads(per_endpoint=1, node_id="n1")).heads) == 2  # capped per endpoint
    head = await hooks.lease_head("we_1", "job_a", "n1", 60.0)
    assert head.event_id == "evt_1" and head.status is DeliveryStatus.PENDING and head.body == '{"seq": 1}'
    assert head.lease_node == "n1"

    backoff_until = time.time() + 3600
    assert await hooks.record_attempt(head.id, "n1", status=DeliveryStatus.PENDING, http_status=500,
                                      error="HTTP 500", next_attempt_at=backoff_until, at=40.0)
    retried = await hooks.get_delivery("we_1", head.id)
    assert (retried.attempts, retried.last_status, retried.next_attempt_at) == (1, 500, backoff_until)
    assert retried.lease_node is None  # a recorded attempt ends the lease
    assert await hooks.retry_now("we_1") == 1  # due now, not in an hour
    assert (await hooks.get_delivery("we_1", head.id)).next_attempt_at < backoff_until
    assert (await hooks.lease_head("we_1", "job_a", "n1", 60.0)).id == head.id
    assert await hooks.record_attempt(head.id, "n1", status=DeliveryStatus.DELIVERED, http_status=200, error=None,
                                      next_attempt_at=0.0, at=41.0)
    second = await hooks.lease_head("we_1", "job_a", "n1", 60.0)
    assert second.event_id == "evt_2"  # strictly in order
    assert await hooks.record_attempt(second.id, "n1", status=DeliveryStatus.DEAD, http_status=None,
                                      error="refused", next_attempt_at=0.0, at=42.0)
    assert await hooks.counts() == {"delivered": 1, "dead": 1, "pending": 3}

    newest = await hooks.list_deliveries("we_1", limit=2)
    assert [d.event_id for d in newest] == ["evt_b1", "evt_3"]
    assert [d.event_id for d in await hooks.list_deliveries("we_1", before=newest[-1].id)] == ["evt_2", "evt_1"]
    assert [d.event_id for d in await hooks.list_deliveries("we_1", status="dead")] == ["evt_2"]
    assert [d.event_id for d in await hooks.list_deliveries("we_1", job_id="job_b")] == ["evt_b1"]
    assert await hooks.get_delivery("we_2", head.id) is None  # another endpoint's row

    assert await hooks.redeliver("we_1") == 1  # every dead row back to pending
    assert (await hooks.get_delivery("we_1", second.id)).status is DeliveryStatus.PENDING
    assert await hooks.redeliver("we_1", [head.id]) == 1 and await hooks.redeliver("we_1", []) == 0
    assert [d.event_id for d in await hooks.job_chain("job_a", "we_1")] == ["evt_1", "evt_2", "evt_3"]

    assert (await hooks.lease_head("we_1", "job_a", "n1", 60.0)).id == head.id  # redelivered: the head again
    await hooks.record_attempt(head.id, "n1", status=DeliveryStatus.DELIVERED, http_status=200, error=None,
                               next_attempt_at=0.0, at=43.0)
    assert await hooks.prune(older_than=100.0) == 1  # finished rows only; pending ones stay
    assert await hooks.delete_endpoint("we_1") is True
    assert await hooks.job_chain("job_a", "we_1") == [] and await hooks.counts() == {"pending": 1}


async def test_a_chain_is_leased_by_one_node_at_a_time_head_first(stores: Stores) -> None:
    """Row leases (bridge/stores/webhooks.py): only a chain's head is leased; another node skips a
    chain with a live lease, cannot take it or record on it, and goes on once it is recorded,
    released, or has run out; a late record of a node whose lease was taken over changes nothing."""
    hooks = stores.webhooks
    await hooks.create_endpoint(endpoint("we_1"))
    await hooks.enqueue([("we_1", "job_a", "evt_a1", 1, "final", "{}", 10.0),
                         ("we_1", "job_a", "evt_a2", 2, "final", "{}", 11.0),
                         ("we_1", "job_b", "evt_b1", 1, "final", "{}", 12.0)])
    a1 = await hooks.lease_head("we_1", "job_a", "n1", 600.0)
    assert (a1.event_id, a1.lease_node) == ("evt_a1", "n1")
    seen = await hooks.chain_heads(per_endpoint=10, node_id="n2")
    assert [d.event_id for d in seen.heads] == ["evt_b1"] and seen.chains == 2  # job_a is n1's
    assert 0 < seen.lease_wait_s <= 600.0
    # a node's own lease never hides a chain from it (its previous run under the same id held it)
    assert [d.event_id for d in (await hooks.chain_heads(per_endpoint=10, node_id="n1")).heads] == ["evt_a1",
                                                                                                    "evt_b1"]
    assert await hooks.lease_head("we_1", "job_a", "n2", 600.0) is None
    ok = dict(status=DeliveryStatus.DELIVERED, http_status=200, error=None, next_attempt_at=0.0, at=50.0)
    assert await hooks.record_attempt(a1.id, "n2", **ok) is False  # n2 never held it
    assert (await hooks.get_delivery("we_1", a1.id)).attempts == 0
    assert await hooks.record_attempt(a1.id, "n1", **ok) is True
    a2 = await hooks.lease_head("we_1", "job_a", "n2", 600.0)  # the next head, now free
    assert a2.event_id == "evt_a2" and await hooks.lease_head("we_1", "job_a", "n1", 600.0) is None
    assert await hooks.release_leases("n2") == 1  # n2 stops gracefully: n1 goes on at once
    assert (await hooks.lease_head("we_1", "job_a", "n1", 600.0)).id == a2.id

    # n1 takes job_b and stalls past its lease (a lease of 0 s has run out at once): n2 takes it
    # over, and n1's late result, whatever it was, does not overwrite n2's
    b1 = await hooks.lease_head("we_1", "job_b", "n1", 0.0)
    assert [d.event_id for d in (await hooks.chain_heads(per_endpoint=10, node_id="n2")).heads] == ["evt_b1"]
    taken = await hooks.lease_head("we_1", "job_b", "n2", 600.0)
    assert taken is not None and taken.id == b1.id and taken.lease_node == "n2"
    failed = dict(status=DeliveryStatus.PENDING, http_status=500, error="HTTP 500", next_attempt_at=99.0, at=51.0)
    assert await hooks.record_attempt(b1.id, "n1", **failed) is False
    assert await hooks.record_attempt(b1.id, "n2", **ok) is True
    row = await hooks.get_delivery("we_1", b1.id)
    assert (row.status, row.attempts, row.last_status, row.lease_node) == (DeliveryStatus.DELIVERED, 1, 200, None)
    assert await hooks.record_attempt(b1.id, "n1", **failed) is False  # nor after n2 recorded
    assert (await hooks.get_delivery("we_1", b1.id)).status is DeliveryStatus.DELIVERED


async def test_one_head_is_leased_by_one_of_many_racing_nodes(url: str) -> None:
    """Two openings of one database (two nodes) race to lease one chain's head: one wins."""
    a, b = await open_stores(url), await open_stores(url)
    try:
        await a.webhooks.create_endpoint(endpoint("we_1"))
        await a.webhooks.enqueue([("we_1", "job_a", f"evt_{i}", i, "final", "{}", 10.0) for i in (1, 2)])
        results = await asyncio.gather(*((a if i % 2 else b).webhooks.lease_head("we_1", "job_a", f"n{i}", 600.0)
                                         for i in range(12)))
        won = [r for r in results if r is not None]
        assert len(won) == 1 and won[0].event_id == "evt_1", won
        assert (await b.webhooks.get_delivery("we_1", won[0].id)).lease_node == won[0].lease_node
    finally:
        await a.close()
        await b.close()


# --------------------------------------------------------------------------- choosing the backend


async def test_unknown_scheme_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown scheme 'mysql'; known: postgres, postgresql, sqlite"):
        await open_stores("mysql://callbridge@db.example/callbridge")
    with pytest.raises(ConfigError, match="SCHEME://"):
        await open_stores("callbridge.db")
    with pytest.raises(ConfigError, match="must name a database file"):
        await open_stores("sqlite://:memory:")


def test_unknown_scheme_is_a_config_error_naming_its_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(env={"CALLBRIDGE_STORAGE_URL": "mongodb://db.example/x"}, config_file=None)
    assert str(e.value) == ("storage.url has unknown scheme 'mongodb'; known: sqlite, postgresql, postgres "
                            "(from environment variable CALLBRIDGE_STORAGE_URL)")
    toml = tmp_path / "cb.toml"
    toml.write_text('[storage]\nurl = "no-scheme-here"\n')
    with pytest.raises(ConfigError, match=r"storage.url must look like SCHEME://.*\(from config file"):
        load_config(env={}, config_file=str(toml))
    # the password of a database URL never reaches a config dump
    dump = Config(storage=StorageConfig(url="postgresql://cb:hunter2@db.example/cb")).to_dict()
    assert dump["storage"]["url"] == "postgresql://cb:****@db.example/cb"


def test_cli_refuses_an_unknown_scheme_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CALLBRIDGE_STORAGE_URL": "redis://localhost/0"}
    r = subprocess.run([sys.executable, "-m", "bridge", "keys", "list", "--data-dir", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == ("callbridge: error: storage.url has unknown scheme 'redis'; known: sqlite, postgresql, "
                                "postgres "
                                "(from environment variable CALLBRIDGE_STORAGE_URL)")


def test_schemes_known_to_config_are_the_registered_backends() -> None:
    from bridge.config import STORE_SCHEMES

    assert set(STORE_SCHEMES) == set(BACKENDS)


async def test_default_url_reads_the_existing_database_in_data_dir(tmp_path: Path) -> None:
    """No migration: a data dir written before storage.url existed (callbridge.db in data_dir,
    here written by the SQLite key store directly) is what the default URL opens."""
    data = tmp_path / "data"
    old = SqliteKeyStore(str(data / DB_NAME))
    key, secret = old.create_key(name="from-before")
    old.close()
    url = store_url(load_config({"data_dir": str(data)}, env={}))
    assert url == f"sqlite://{(data / DB_NAME).resolve()}"
    stores = await open_stores(url, create=False)
    try:
        assert (await stores.keys.verify_key(secret)).name == "from-before"
    finally:
        await stores.close()


async def test_missing_or_unusable_database_is_reported_not_created(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFound) as e:
        await open_stores(f"sqlite://{tmp_path / 'absent.db'}", create=False)
    assert e.value.where == str(tmp_path / "absent.db") and not (tmp_path / "absent.db").exists()
    (tmp_path / "junk.db").write_bytes(b"this is not a database file at all" * 100)
    with pytest.raises(StoreUnavailable, match="cannot open .*junk.db: file is not a database"):
        await open_stores(f"sqlite://{tmp_path / 'junk.db'}")


def test_nothing_outside_the_store_package_opens_a_database_or_threads_a_store() -> None:
    """The seam holds: only bridge/stores speaks SQL, and no caller hands an (async) store method to
    a thread, which would return an un-awaited coroutine and silently skip the write.
    (bridge/storage.py only recognizes SQLite's disk-full error; it opens nothing.)"""
    offenders = []
    for path in sorted((ROOT / "bridge").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("bridge/stores/"):
            continue
        text = path.read_text()
        if rel != "bridge/storage.py" and re.search(r"^\s*(import sqlite3|from sqlite3 )", text, re.M):
            offenders.append(f"{rel}: imports sqlite3")
        if re.search(r"sqlite3?\.connect\(|\bconnect\(\s*[\"']?[\w./]*\.db", text):
            offenders.append(f"{rel}: connects to a database")
        for m in re.finditer(r"to_thread\(\s*(?:[\w\[\]]+\.)*(?:store|keys|stores)\.\w+", text):
            offenders.append(f"{rel}: {m.group(0)}")
    assert offenders == []
