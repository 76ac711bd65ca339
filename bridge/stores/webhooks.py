"""The webhook store's interface: endpoints and the delivery outbox.

The outbox is one row per (event, endpoint). Rows of one job and endpoint form a chain that is
delivered strictly in insertion order: only the oldest pending row of a chain (its head) is ever
attempted, so a receiver sees a job's events in the order they happened, retries included. A
delivery's id is an integer the store assigns, increasing in insertion order (an identity column
in PostgreSQL), because chains and the REST API's paging order by it.

Transactions: `enqueue` is all-or-nothing for its batch (the dispatcher batches the events of a
moment); every other write is one statement's worth of atomicity. The dispatcher is the only
writer of attempts, so no row locking is asked of a backend; a backend shared by several
dispatchers must make `chain_heads` claim rows (PostgreSQL: FOR UPDATE SKIP LOCKED).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from bridge.webhooks.model import Delivery, DeliveryStatus, Endpoint

__all__ = ["NewDelivery", "WebhookStore"]

# (endpoint_id, job_id, event_id, seq, type, body, created_at)
NewDelivery = tuple[str, str, str, int, str, str, float]


class WebhookStore(Protocol):
    # -- endpoints ---------------------------------------------------------------------------

    async def create_endpoint(self, ep: Endpoint) -> Endpoint: ...

    async def get_endpoint(self, endpoint_id: str, owner: str | None = None) -> Endpoint | None: ...

    async def list_endpoints(self, owner: str | None = None) -> list[Endpoint]:
        """Oldest first; every owner's when `owner` is None."""

    async def count_endpoints(self, owner: str) -> int: ...

    async def update_endpoint(self, endpoint_id: str, **fields: Any) -> Endpoint | None:
        """Change url / secret / events / sources / description / enabled (ValueError otherwise)."""

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        """The endpoint and its outbox rows; False if it did not exist."""

    async def sync_config_endpoints(self, endpoints: list[Endpoint]) -> None:
        """Operator endpoints follow the config: upserted by id; ones no longer configured are
        disabled, not deleted, so their delivery history stays readable."""

    # -- outbox ------------------------------------------------------------------------------

    async def enqueue(self, rows: Iterable[NewDelivery]) -> int:
        """Add pending rows, all or none; returns how many."""

    async def chain_heads(self, per_endpoint: int) -> tuple[list[Delivery], int]:
        """The head of each chain of an enabled endpoint, at most `per_endpoint` per endpoint,
        soonest due first and interleaved across endpoints; and how many chains are pending."""

    async def chain_head(self, endpoint_id: str, job_id: str) -> Delivery | None: ...

    async def record_attempt(self, delivery_id: int, *, status: DeliveryStatus, http_status: int | None,
                             error: str | None, next_attempt_at: float, at: float) -> None: ...

    async def list_deliveries(self, endpoint_id: str, status: str | None = None, job_id: str | None = None,
                              limit: int = 50, before: int | None = None) -> list[Delivery]:
        """Newest first; `before` is the id to page below."""

    async def get_delivery(self, endpoint_id: str, delivery_id: int) -> Delivery | None: ...

    async def redeliver(self, endpoint_id: str, delivery_ids: list[int] | None = None) -> int:
        """Back to pending with a fresh retry period: the given rows, or every dead row."""

    async def retry_now(self, endpoint_id: str) -> int:
        """Pending rows waiting out a backoff become due now."""

    async def job_chain(self, job_id: str, endpoint_id: str) -> list[Delivery]: ...

    async def prune(self, older_than: float) -> int:
        """Delete finished (not pending) rows last touched before `older_than`."""

    async def counts(self) -> dict[str, int]:
        """Rows per status."""

    async def close(self) -> None: ...
