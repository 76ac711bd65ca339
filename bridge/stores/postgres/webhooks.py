"""Webhook endpoints and the delivery outbox in PostgreSQL: bridge.stores.WebhookStore on the
shared pool (pool.py); the tables are defined by the migrations (migrations.py). A delivery's id
is an identity column, increasing in insertion order as chains require.

Several nodes deliver from this one outbox with row leases (the protocol is in
bridge/stores/webhooks.py). A lease is taken by a conditional UPDATE ... RETURNING whose lease
test is on the row being updated: when two nodes race for one head, the second waits on the row
lock and PostgreSQL re-checks that test against the first node's committed lease (READ
COMMITTED's re-check of the target row), so it updates nothing. Lease times are the server's
clock (now(): the transaction's start, and every method here is one short transaction), never a
node's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from bridge.stores.postgres.pool import Pool
from bridge.stores.webhooks import ChainHeads, NewDelivery
from bridge.webhooks.model import Delivery, DeliveryStatus, Endpoint

__all__ = ["PgWebhookStore"]

_UPDATABLE = {"url", "secret", "events", "sources", "description", "enabled"}


def _row_endpoint(r: dict[str, Any]) -> Endpoint:
    return Endpoint(id=r["id"], owner=r["owner"], url=r["url"], secret=r["secret"],
                    events=tuple(json.loads(r["events"])), sources=tuple(json.loads(r["sources"])),
                    description=r["description"], enabled=bool(r["enabled"]), managed_by=r["managed_by"],
                    created_at=r["created_at"], updated_at=r["updated_at"])


def _row_delivery(r: dict[str, Any]) -> Delivery:
    return Delivery(id=r["id"], endpoint_id=r["endpoint_id"], job_id=r["job_id"], event_id=r["event_id"],
                    seq=r["seq"], type=r["type"], body=r["body"], status=DeliveryStatus(r["status"]),
                    attempts=r["attempts"], created_at=r["created_at"], next_attempt_at=r["next_attempt_at"],
                    last_attempt_at=r["last_attempt_at"], last_status=r["last_status"],
                    last_error=r["last_error"], delivered_at=r["delivered_at"], lease_node=r["lease_node"],
                    lease_until=r["lease_until"])


_NOW = "EXTRACT(EPOCH FROM now())::float8"
# A pending row leased by another node whose lease has not run out.
_FOREIGN_LEASE = f"lease_node IS NOT NULL AND lease_node <> %(node)s AND lease_until > {_NOW}"


class PgWebhookStore:
    """bridge.stores.WebhookStore in PostgreSQL; every method is one transaction."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    # -- endpoints -------------------------------------------------------------------------

    async def create_endpoint(self, ep: Endpoint) -> Endpoint:
        async with self._pool.tx() as db:
            await db.execute(
                "INSERT INTO webhook_endpoints (id, owner, url, secret, events, sources, description, enabled,"
                " managed_by, created_at, updated_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                (ep.id, ep.owner, ep.url, ep.secret, json.dumps(list(ep.events)), json.dumps(list(ep.sources)),
                 ep.description, bool(ep.enabled), ep.managed_by, ep.created_at, ep.updated_at))
        return ep

    async def get_endpoint(self, endpoint_id: str, owner: str | None = None) -> Endpoint | None:
        sql, args = "SELECT * FROM webhook_endpoints WHERE id = %s", [endpoint_id]
        if owner is not None:
            sql += " AND owner = %s"
            args.append(owner)
        async with self._pool.tx() as db:
            r = await (await db.execute(sql, args)).fetchone()
        return _row_endpoint(r) if r else None

    async def list_endpoints(self, owner: str | None = None) -> list[Endpoint]:
        sql, args = "SELECT * FROM webhook_endpoints", []
        if owner is not None:
            sql += " WHERE owner = %s"
            args.append(owner)
        async with self._pool.tx() as db:
            rows = await (await db.execute(sql + " ORDER BY created_at, id", args)).fetchall()
        return [_row_endpoint(r) for r in rows]

    async def count_endpoints(self, owner: str) -> int:
        async with self._pool.tx() as db:
            r = await (await db.execute("SELECT COUNT(*) AS n FROM webhook_endpoints WHERE owner = %s",
                                        (owner,))).fetchone()
        return int(r["n"])

    async def update_endpoint(self, endpoint_id: str, **fields: Any) -> Endpoint | None:
        bad = set(fields) - _UPDATABLE
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        sets, args = ["updated_at = %s"], [time.time()]
        for k, v in fields.items():  # names from _UPDATABLE only
            sets.append(f"{k} = %s")
            args.append(json.dumps(list(v)) if k in ("events", "sources") else bool(v) if k == "enabled" else v)
        async with self._pool.tx() as db:
            r = await (await db.execute(f"UPDATE webhook_endpoints SET {', '.join(sets)} WHERE id = %s RETURNING *",
                                        (*args, endpoint_id))).fetchone()
        return _row_endpoint(r) if r else None

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        async with self._pool.tx() as db:  # its outbox rows go with it (ON DELETE CASCADE)
            cur = await db.execute("DELETE FROM webhook_endpoints WHERE id = %s", (endpoint_id,))
            return cur.rowcount > 0

    async def sync_config_endpoints(self, endpoints: list[Endpoint]) -> None:
        now = time.time()
        async with self._pool.tx() as db:
            for ep in endpoints:
                await db.execute(
                    "INSERT INTO webhook_endpoints (id, owner, url, secret, events, sources, description, enabled,"
                    " managed_by, created_at, updated_at) VALUES (%s,%s,%s,%s,%s,%s,%s,TRUE,'config',%s,%s)"
                    " ON CONFLICT (id) DO UPDATE SET owner=excluded.owner, url=excluded.url, secret=excluded.secret,"
                    " events=excluded.events, sources=excluded.sources, description=excluded.description,"
                    " enabled=TRUE, updated_at=excluded.updated_at",
                    (ep.id, ep.owner, ep.url, ep.secret, json.dumps(list(ep.events)), json.dumps(list(ep.sources)),
                     ep.description, now, now))
            await db.execute("UPDATE webhook_endpoints SET enabled = FALSE, updated_at = %s"
                             " WHERE managed_by = 'config' AND NOT (id = ANY(%s))",
                             (now, [ep.id for ep in endpoints]))

    # -- outbox ----------------------------------------------------------------------------

    async def enqueue(self, rows: Iterable[NewDelivery]) -> int:
        batch = [(*r, DeliveryStatus.PENDING.value, r[6]) for r in rows]
        if not batch:
            return 0
        async with self._pool.tx() as db, db.cursor() as cur:
            await cur.executemany(
                "INSERT INTO webhook_deliveries (endpoint_id, job_id, event_id, seq, type, body, created_at,"
                " status, next_attempt_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)", batch)
        return len(batch)

    async def chain_heads(self, per_endpoint: int, node_id: str) -> ChainHeads:
        """As the SQLite store's: capped per endpoint, interleaved across endpoints, without the
        chains another node holds a live lease on."""
        args = {"node": node_id, "per": per_endpoint}
        async with self._pool.tx() as db:
            chains = await (await db.execute(
                f"SELECT COUNT(*) AS chains, MIN(leased_until) - {_NOW} AS wait FROM (SELECT MAX(CASE WHEN"
                f" {_FOREIGN_LEASE} THEN lease_until END) AS leased_until FROM webhook_deliveries"
                " WHERE status = 'pending' GROUP BY endpoint_id, job_id) c", args)).fetchone()
            rows = await (await db.execute(
                "SELECT * FROM (SELECT d.*, ROW_NUMBER() OVER (PARTITION BY d.endpoint_id"
                " ORDER BY d.next_attempt_at, d.id) AS rn"
                " FROM webhook_deliveries d JOIN (SELECT MIN(id) AS id FROM webhook_deliveries"
                " WHERE status = 'pending' GROUP BY endpoint_id, job_id"
                f" HAVING NOT bool_or(COALESCE({_FOREIGN_LEASE}, FALSE))) h ON d.id = h.id"
                " JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.enabled) heads"
                " WHERE rn <= %(per)s ORDER BY rn, next_attempt_at, id", args)).fetchall()
        wait = chains["wait"]
        return ChainHeads([_row_delivery(r) for r in rows], int(chains["chains"]),
                          None if wait is None else max(0.0, float(wait)))

    async def lease_head(self, endpoint_id: str, job_id: str, node_id: str, lease_s: float) -> Delivery | None:
        """The head's own lease and status are tested on the updated row (re-checked after a
        concurrent claim commits); the chain-wide test covers a row redelivered in front of a
        head another node is attempting."""
        args = {"node": node_id, "lease": lease_s, "ep": endpoint_id, "job": job_id}
        async with self._pool.tx() as db:
            r = await (await db.execute(
                f"UPDATE webhook_deliveries SET lease_node = %(node)s, lease_until = {_NOW} + %(lease)s"
                " WHERE id = (SELECT MIN(id) FROM webhook_deliveries WHERE status = 'pending'"
                " AND endpoint_id = %(ep)s AND job_id = %(job)s) AND status = 'pending'"
                f" AND NOT COALESCE({_FOREIGN_LEASE}, FALSE)"
                " AND NOT EXISTS (SELECT 1 FROM webhook_deliveries o WHERE o.status = 'pending'"
                " AND o.endpoint_id = %(ep)s AND o.job_id = %(job)s AND o.lease_node IS NOT NULL"
                f" AND o.lease_node <> %(node)s AND o.lease_until > {_NOW}) RETURNING *", args)).fetchone()
        return _row_delivery(r) if r else None

    async def record_attempt(self, delivery_id: int, node_id: str, *, status: DeliveryStatus,
                             http_status: int | None, error: str | None, next_attempt_at: float,
                             at: float) -> bool:
        async with self._pool.tx() as db:
            cur = await db.execute(
                "UPDATE webhook_deliveries SET status = %s, attempts = attempts + 1, last_attempt_at = %s,"
                " last_status = %s, last_error = %s, next_attempt_at = %s,"
                " delivered_at = CASE WHEN %s::text = 'delivered' THEN %s ELSE delivered_at END,"
                " lease_node = NULL, lease_until = NULL WHERE id = %s AND lease_node = %s",
                (status.value, at, http_status, error, next_attempt_at, status.value, at, delivery_id, node_id))
            return cur.rowcount > 0

    async def release_leases(self, node_id: str) -> int:
        async with self._pool.tx() as db:
            return (await db.execute("UPDATE webhook_deliveries SET lease_node = NULL, lease_until = NULL"
                                     " WHERE lease_node = %s", (node_id,))).rowcount

    async def list_deliveries(self, endpoint_id: str, status: str | None = None, job_id: str | None = None,
                              limit: int = 50, before: int | None = None) -> list[Delivery]:
        where, args = ["endpoint_id = %s"], [endpoint_id]
        if status:
            where.append("status = %s")
            args.append(status)
        if job_id:
            where.append("job_id = %s")
            args.append(job_id)
        if before is not None:
            where.append("id < %s")
            args.append(before)
        async with self._pool.tx() as db:
            rows = await (await db.execute(f"SELECT * FROM webhook_deliveries WHERE {' AND '.join(where)}"
                                           " ORDER BY id DESC LIMIT %s", (*args, limit))).fetchall()
        return [_row_delivery(r) for r in rows]

    async def get_delivery(self, endpoint_id: str, delivery_id: int) -> Delivery | None:
        async with self._pool.tx() as db:
            r = await (await db.execute("SELECT * FROM webhook_deliveries WHERE id = %s AND endpoint_id = %s",
                                        (delivery_id, endpoint_id))).fetchone()
        return _row_delivery(r) if r else None

    async def redeliver(self, endpoint_id: str, delivery_ids: list[int] | None = None) -> int:
        if delivery_ids == []:
            return 0
        now = time.time()
        sql = ("UPDATE webhook_deliveries SET status = 'pending', attempts = 0, created_at = %s,"
               " next_attempt_at = %s WHERE endpoint_id = %s")
        args: list[Any] = [now, now, endpoint_id]
        if delivery_ids is None:
            sql += " AND status = 'dead'"
        else:
            sql += " AND id = ANY(%s)"
            args.append(list(delivery_ids))
        async with self._pool.tx() as db:
            return (await db.execute(sql, args)).rowcount

    async def retry_now(self, endpoint_id: str) -> int:
        now = time.time()
        async with self._pool.tx() as db:
            return (await db.execute("UPDATE webhook_deliveries SET next_attempt_at = %s WHERE endpoint_id = %s"
                                     " AND status = 'pending' AND next_attempt_at > %s",
                                     (now, endpoint_id, now))).rowcount

    async def job_chain(self, job_id: str, endpoint_id: str) -> list[Delivery]:
        async with self._pool.tx() as db:
            rows = await (await db.execute("SELECT * FROM webhook_deliveries WHERE job_id = %s AND endpoint_id = %s"
                                           " ORDER BY id", (job_id, endpoint_id))).fetchall()
        return [_row_delivery(r) for r in rows]

    async def prune(self, older_than: float) -> int:
        async with self._pool.tx() as db:
            return (await db.execute(
                "DELETE FROM webhook_deliveries WHERE status != 'pending' AND COALESCE(delivered_at,"
                " last_attempt_at, created_at) < %s", (older_than,))).rowcount

    async def counts(self) -> dict[str, int]:
        async with self._pool.tx() as db:
            rows = await (await db.execute("SELECT status, COUNT(*) AS n FROM webhook_deliveries GROUP BY status")
                          ).fetchall()
        return {r["status"]: int(r["n"]) for r in rows}

    async def close(self) -> None:
        await self._pool.release()
