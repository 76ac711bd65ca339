"""The async faces of the blocking SQLite stores: every call runs in a worker thread.

The sqlite3 driver blocks, and a slow disk must not stall the event loop that carries live
calls, so the thread hop that every caller used to write (`asyncio.to_thread(store.get_job, ...)`)
lives here, once, behind the async interfaces of bridge/stores. The blocking classes stay
usable on their own (tests, and anything already in a thread).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

from bridge.jobs.model import Job, JobSource, JobStatus, Segment
from bridge.stores.keys import ApiKey, settle_orphans
from bridge.stores.nodes import DEAD_NODE_REASON, Node, TakeOver
from bridge.stores.sqlite.jobs import SqliteJobStore
from bridge.stores.sqlite.keys import SqliteKeyStore
from bridge.stores.sqlite.nodes import SqliteNodeStore
from bridge.stores.sqlite.webhooks import SqliteWebhookStore
from bridge.stores.webhooks import ChainHeads, NewDelivery
from bridge.webhooks.model import Delivery, DeliveryStatus, Endpoint

__all__ = ["ThreadedJobStore", "ThreadedKeyStore", "ThreadedNodeStore", "ThreadedWebhookStore"]

_run = asyncio.to_thread


class ThreadedJobStore:
    """bridge.stores.JobStore over a SqliteJobStore."""

    def __init__(self, blocking: SqliteJobStore) -> None:
        self.blocking = blocking

    async def create_job(self, job: Job) -> Job:
        return await _run(self.blocking.create_job, job)

    async def get_job(self, job_id: str, owner: str | None = None) -> Job | None:
        return await _run(self.blocking.get_job, job_id, owner)

    async def list_jobs(self, owner: str | None = None, status: JobStatus | str | None = None,
                        source: JobSource | str | None = None, since: float | None = None,
                        limit: int = 50, cursor: str | None = None) -> tuple[list[Job], str | None]:
        return await _run(self.blocking.list_jobs, owner, status, source, since, limit, cursor)

    async def add_segment(self, job_id: str, final: dict[str, Any]) -> Segment:
        return await _run(self.blocking.add_segment, job_id, final)

    async def segments(self, job_id: str) -> list[Segment]:
        return await _run(self.blocking.segments, job_id)

    async def finish_job(self, job_id: str, status: JobStatus | str, duration_s: float,
                         error: dict[str, Any] | None = None, ended_at: float | None = None) -> None:
        await _run(self.blocking.finish_job, job_id, status, duration_s, error, ended_at)

    async def update_job(self, job_id: str, **fields: Any) -> None:
        await _run(self.blocking.update_job, job_id, **fields)

    async def edit_segment(self, job_id: str, segment_id: int, text: str | None = None,
                           speaker: str | None = None) -> Segment:
        return await _run(self.blocking.edit_segment, job_id, segment_id, text, speaker)

    async def rename_speaker(self, job_id: str, old: str, new: str) -> int:
        return await _run(self.blocking.rename_speaker, job_id, old, new)

    async def delete_job(self, job_id: str) -> Job | None:
        return await _run(self.blocking.delete_job, job_id)

    async def fail_live_jobs(self, reason: str, node_id: str | None = None) -> list[str]:
        return await _run(self.blocking.fail_live_jobs, reason, node_id)

    async def close(self) -> None:
        await _run(self.blocking.close)


class ThreadedKeyStore:
    """bridge.stores.KeyStore over a SqliteKeyStore."""

    def __init__(self, blocking: SqliteKeyStore) -> None:
        self.blocking = blocking

    @property
    def clock(self) -> Callable[[], float]:
        """The blocking store's clock (settable: tests move time instead of waiting)."""
        return self.blocking.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.blocking.clock = clock

    async def create_key(self, name: str | None = None, credits: int | None = None) -> tuple[ApiKey, str]:
        return await _run(self.blocking.create_key, name, credits)

    async def ensure_keys(self, secrets: Iterable[str]) -> None:
        await _run(self.blocking.ensure_keys, list(secrets))

    async def active_key_count(self) -> int:
        return await _run(self.blocking.active_key_count)

    async def list_keys(self) -> list[ApiKey]:
        return await _run(self.blocking.list_keys)

    async def get_key(self, key_id: str) -> ApiKey | None:
        return await _run(self.blocking.get_key, key_id)

    async def verify_key(self, secret: str) -> ApiKey | None:
        return await _run(self.blocking.verify_key, secret)

    async def revoke(self, key_id: str) -> bool:
        return await _run(self.blocking.revoke, key_id)

    async def add_credits(self, key_id: str, amount: int) -> int:
        return await _run(self.blocking.add_credits, key_id, amount)

    async def set_unlimited(self, key_id: str) -> None:
        await _run(self.blocking.set_unlimited, key_id)

    async def mint_temp_token(self, key_id: str, expires_in: int) -> tuple[str, float]:
        return await _run(self.blocking.mint_temp_token, key_id, expires_in)

    async def consume_temp_token(self, token: str, *, spend: bool = True) -> str:
        return await _run(self.blocking.consume_temp_token, token, spend=spend)

    async def release_temp_token(self, token_hash: str) -> None:
        await _run(self.blocking.release_temp_token, token_hash)

    async def reserve(self, owner: str, job_id: str, credits: int) -> None:
        await _run(self.blocking.reserve, owner, job_id, credits)

    async def settle(self, job_id: str, used: int) -> None:
        await _run(self.blocking.settle, job_id, used)

    async def open_reservations(self) -> dict[str, int]:
        return await _run(self.blocking.open_reservations)

    async def settle_orphans(self, used_for: Callable[[str], Awaitable[int]],
                             only: Callable[[Collection[str]], Awaitable[Collection[str]]] | None = None) -> int:
        return await settle_orphans(self, used_for, only)

    async def close(self) -> None:
        await _run(self.blocking.close)


class ThreadedWebhookStore:
    """bridge.stores.WebhookStore over a SqliteWebhookStore."""

    def __init__(self, blocking: SqliteWebhookStore) -> None:
        self.blocking = blocking

    async def create_endpoint(self, ep: Endpoint) -> Endpoint:
        return await _run(self.blocking.create_endpoint, ep)

    async def get_endpoint(self, endpoint_id: str, owner: str | None = None) -> Endpoint | None:
        return await _run(self.blocking.get_endpoint, endpoint_id, owner)

    async def list_endpoints(self, owner: str | None = None) -> list[Endpoint]:
        return await _run(self.blocking.list_endpoints, owner)

    async def count_endpoints(self, owner: str) -> int:
        return await _run(self.blocking.count_endpoints, owner)

    async def update_endpoint(self, endpoint_id: str, **fields: Any) -> Endpoint | None:
        return await _run(self.blocking.update_endpoint, endpoint_id, **fields)

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        return await _run(self.blocking.delete_endpoint, endpoint_id)

    async def sync_config_endpoints(self, endpoints: list[Endpoint]) -> None:
        await _run(self.blocking.sync_config_endpoints, endpoints)

    async def enqueue(self, rows: Iterable[NewDelivery]) -> int:
        return await _run(self.blocking.enqueue, list(rows))

    async def chain_heads(self, per_endpoint: int, node_id: str) -> ChainHeads:
        return await _run(self.blocking.chain_heads, per_endpoint, node_id)

    async def lease_head(self, endpoint_id: str, job_id: str, node_id: str, lease_s: float) -> Delivery | None:
        return await _run(self.blocking.lease_head, endpoint_id, job_id, node_id, lease_s)

    async def record_attempt(self, delivery_id: int, node_id: str, *, status: DeliveryStatus,
                             http_status: int | None, error: str | None, next_attempt_at: float,
                             at: float) -> bool:
        return await _run(self.blocking.record_attempt, delivery_id, node_id, status=status,
                          http_status=http_status, error=error, next_attempt_at=next_attempt_at, at=at)

    async def release_leases(self, node_id: str) -> int:
        return await _run(self.blocking.release_leases, node_id)

    async def list_deliveries(self, endpoint_id: str, status: str | None = None, job_id: str | None = None,
                              limit: int = 50, before: int | None = None) -> list[Delivery]:
        return await _run(self.blocking.list_deliveries, endpoint_id, status, job_id, limit, before)

    async def get_delivery(self, endpoint_id: str, delivery_id: int) -> Delivery | None:
        return await _run(self.blocking.get_delivery, endpoint_id, delivery_id)

    async def redeliver(self, endpoint_id: str, delivery_ids: list[int] | None = None) -> int:
        return await _run(self.blocking.redeliver, endpoint_id, delivery_ids)

    async def retry_now(self, endpoint_id: str) -> int:
        return await _run(self.blocking.retry_now, endpoint_id)

    async def job_chain(self, job_id: str, endpoint_id: str) -> list[Delivery]:
        return await _run(self.blocking.job_chain, job_id, endpoint_id)

    async def prune(self, older_than: float) -> int:
        return await _run(self.blocking.prune, older_than)

    async def counts(self) -> dict[str, int]:
        return await _run(self.blocking.counts)

    async def close(self) -> None:
        await _run(self.blocking.close)


class ThreadedNodeStore:
    """bridge.stores.NodeStore over a SqliteNodeStore."""

    def __init__(self, blocking: SqliteNodeStore) -> None:
        self.blocking = blocking

    async def heartbeat(self, node_id: str, url: str, started_at: float, draining: bool = False,
                        now: float | None = None) -> bool:
        return await _run(self.blocking.heartbeat, node_id, url, started_at, draining, now)

    async def list_nodes(self) -> list[Node]:
        return await _run(self.blocking.list_nodes)


    async def take_over(self, node_id: str, ttl_s: float, reason: str = DEAD_NODE_REASON,
                        now: float | None = None) -> TakeOver | None:
        return await _run(self.blocking.take_over, node_id, ttl_s, reason, now)

    async def remove_node(self, node_id: str) -> None:
        await _run(self.blocking.remove_node, node_id)

    async def open_session(self, job_id: str, owner: str, node_id: str, limit: int | None,
                           now: float | None = None) -> None:
        await _run(self.blocking.open_session, job_id, owner, node_id, limit, now)

    async def end_session(self, job_id: str) -> None:
        await _run(self.blocking.end_session, job_id)

    async def session_jobs(self) -> set[str]:
        return await _run(self.blocking.session_jobs)

    async def clear_sessions(self, node_id: str) -> int:
        return await _run(self.blocking.clear_sessions, node_id)

    async def close(self) -> None:
        await _run(self.blocking.close)
