"""The webhook store's interface: endpoints and the delivery outbox.

The outbox is one row per (event, endpoint). Rows of one job and endpoint form a chain that is
delivered strictly in insertion order: only the oldest pending row of a chain (its head) is ever
attempted, so a receiver sees a job's events in the order they happened, retries included. A
delivery's id is an integer the store assigns, increasing in insertion order (an identity column
in PostgreSQL), because chains and the REST API's paging order by it.

Several nodes' dispatchers share one outbox (PostgreSQL), so a chain is delivered by one node at a
time through a lease on its head row (`lease_node`, `lease_until`):

- `chain_heads` is a read: it shows a node the chains it may take, leaving out every chain with a
  live lease of another node, and says when the soonest of those leases runs out. It claims
  nothing, so the chains a node looks at but cannot start (its pool or a breaker says no) stay
  free for the other nodes.
- `lease_head` claims: one conditional UPDATE ... RETURNING that leases the chain's current head
  for `lease_s` seconds, only if it is still the head, still pending, and no other node holds a
  live lease on the chain. Two nodes racing for one chain: one gets the row, the other None. A
  lease of the same node (this process, or its previous run under the same node id) never
  blocks it.
- `record_attempt` applies only while the caller still holds the lease, and ends it. A node whose
  lease ran out while its request hung, and whose row another node has leased since, is told
  False and changes nothing: the new holder's result stands.
- A lease runs out `lease_s` after it was taken, so a dead node's chains go on at another node;
  `release_leases` hands a stopping node's chains over at once.

Lease times are the database's clock where there is one server (PostgreSQL: now()), so nodes'
clock skew cannot make a live lease look expired; `lease_wait_s` is a duration for the same
reason. The same protocol runs on SQLite (one node) so the contract suite holds for both.

What this guarantees: at most one node attempts a row at a time while leases are honoured, and a
row's recorded result is its holder's. It cannot make an HTTP POST exactly-once: a node that dies
(or stalls past its lease) after the receiver took the POST and before its record is committed
leaves the row pending, and the next holder sends it again with the same event id. Delivery is
at least once per event, in order per chain; receivers dedupe on X-Event-Id (docs/webhooks.md).

Transactions: `enqueue` is all-or-nothing for its batch (the dispatcher batches the events of a
moment); every other write is one statement's worth of atomicity.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

from bridge.webhooks.model import Delivery, DeliveryStatus, Endpoint

__all__ = ["ChainHeads", "NewDelivery", "WebhookStore"]

# (endpoint_id, job_id, event_id, seq, type, body, created_at)
NewDelivery = tuple[str, str, str, int, str, str, float]


class ChainHeads(NamedTuple):
    heads: list[Delivery]  # chains this node may take: not leased by another node
    chains: int  # pending chains in all, every node's leased ones included
    lease_wait_s: float | None  # until the soonest live lease of another node runs out; None: none


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

    async def chain_heads(self, per_endpoint: int, node_id: str) -> ChainHeads:
        """The head of each chain of an enabled endpoint that no other node holds a live lease on,
        at most `per_endpoint` per endpoint, soonest due first and interleaved across endpoints.
        A read: nothing is claimed (see `lease_head`)."""

    async def lease_head(self, endpoint_id: str, job_id: str, node_id: str, lease_s: float) -> Delivery | None:
        """Lease the chain's head to `node_id` for `lease_s` seconds and return it; None when the
        chain has no pending row or another node holds a live lease on it."""

    async def record_attempt(self, delivery_id: int, node_id: str, *, status: DeliveryStatus,
                             http_status: int | None, error: str | None, next_attempt_at: float,
                             at: float) -> bool:
        """Record an attempt and end the lease, only if `node_id` still holds it; False (nothing
        changed) when the lease has passed to another node or ended."""

    async def release_leases(self, node_id: str) -> int:
        """End every lease `node_id` holds (a graceful stop), so other nodes go on at once."""

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
