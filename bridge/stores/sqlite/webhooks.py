"""Webhook endpoints and the delivery outbox in SQLite: the blocking implementation behind
bridge.stores.WebhookStore (whose docstring says what a chain and a lease are), with its own
connection to the same database file. The service reaches it through ThreadedWebhookStore.

Leases follow the same protocol as PostgreSQL's, on this host's clock: SQLite serves one node, but
the protocol is the contract (tests/test_store_contract.py runs it on both backends). Each
conditional UPDATE runs under BEGIN IMMEDIATE, so its check and write are one step.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bridge.stores.sqlite import migrations
from bridge.stores.sqlite.db import Tx, connect
from bridge.stores.webhooks import ChainHeads, NewDelivery
from bridge.webhooks.model import Delivery, DeliveryStatus, Endpoint

__all__ = ["SqliteWebhookStore"]

def _row_endpoint(r: sqlite3.Row) -> Endpoint:
    return Endpoint(id=r["id"], owner=r["owner"], url=r["url"], secret=r["secret"],
                    events=tuple(json.loads(r["events"])), sources=tuple(json.loads(r["sources"])),
                    description=r["description"], enabled=bool(r["enabled"]), managed_by=r["managed_by"],
                    created_at=r["created_at"], updated_at=r["updated_at"])


def _row_delivery(r: sqlite3.Row) -> Delivery:
    return Delivery(id=r["id"], endpoint_id=r["endpoint_id"], job_id=r["job_id"], event_id=r["event_id"],
                    seq=r["seq"], type=r["type"], body=r["body"], status=DeliveryStatus(r["status"]),
                    attempts=r["attempts"], created_at=r["created_at"], next_attempt_at=r["next_attempt_at"],
                    last_attempt_at=r["last_attempt_at"], last_status=r["last_status"],
                    last_error=r["last_error"], delivered_at=r["delivered_at"], lease_node=r["lease_node"],
                    lease_until=r["lease_until"])


# A pending row of the chain leased by another node whose lease has not run out (params: node, now).
_FOREIGN_LEASE = "lease_node IS NOT NULL AND lease_node != ? AND lease_until > ?"


class SqliteWebhookStore:
    def __init__(self, path: str | Path) -> None:
        self._lock = threading.Lock()
        self._db = connect(str(path))
        with self._lock:
            migrations.apply(self._db, str(path))  # opened alone it migrates; after open_stores: current

    # -- endpoints -------------------------------------------------------------------------

    def create_endpoint(self, ep: Endpoint) -> Endpoint:
        with self._lock, Tx(self._db):
            self._db.execute(
                "INSERT INTO webhook_endpoints (id, owner, url, secret, events, sources, description, enabled,"
                " managed_by, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (ep.id, ep.owner, ep.url, ep.secret, json.dumps(list(ep.events)), json.dumps(list(ep.sources)),
                 ep.description, int(ep.enabled), ep.managed_by, ep.created_at, ep.updated_at))
        return ep

    def get_endpoint(self, endpoint_id: str, owner: str | None = None) -> Endpoint | None:
        sql, args = "SELECT * FROM webhook_endpoints WHERE id = ?", [endpoint_id]
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        with self._lock:
            r = self._db.execute(sql, args).fetchone()
        return _row_endpoint(r) if r else None

    def list_endpoints(self, owner: str | None = None) -> list[Endpoint]:
        sql, args = "SELECT * FROM webhook_endpoints", []
        if owner is not None:
            sql += " WHERE owner = ?"
            args.append(owner)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_at, id", args).fetchall()
        return [_row_endpoint(r) for r in rows]

    def count_endpoints(self, owner: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) AS n FROM webhook_endpoints WHERE owner = ?",
                                    (owner,)).fetchone()["n"]

    def update_endpoint(self, endpoint_id: str, **fields: Any) -> Endpoint | None:
        cols = {"url", "secret", "events", "sources", "description", "enabled"}
        bad = set(fields) - cols
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        sets, args = ["updated_at = ?"], [time.time()]
        for k, v in fields.items():
            sets.append(f"{k} = ?")
            args.append(json.dumps(list(v)) if k in ("events", "sources") else int(v) if k == "enabled" else v)
        with self._lock, Tx(self._db):
            self._db.execute(f"UPDATE webhook_endpoints SET {', '.join(sets)} WHERE id = ?", (*args, endpoint_id))
        return self.get_endpoint(endpoint_id)

    def delete_endpoint(self, endpoint_id: str) -> bool:
        """The endpoint and its outbox rows (pending ones are not sent anywhere else)."""
        with self._lock, Tx(self._db):
            cur = self._db.execute("DELETE FROM webhook_endpoints WHERE id = ?", (endpoint_id,))
        return cur.rowcount > 0

    def sync_config_endpoints(self, endpoints: list[Endpoint]) -> None:
        """Operator endpoints follow the config: upserted by id; ones no longer configured are
        disabled, not deleted, so their delivery history stays readable."""
        now = time.time()
        with self._lock, Tx(self._db):
            for ep in endpoints:
                self._db.execute(
                    "INSERT INTO webhook_endpoints (id, owner, url, secret, events, sources, description, enabled,"
                    " managed_by, created_at, updated_at) VALUES (?,?,?,?,?,?,?,1,'config',?,?)"
                    " ON CONFLICT(id) DO UPDATE SET owner=excluded.owner, url=excluded.url, secret=excluded.secret,"
                    " events=excluded.events, sources=excluded.sources, description=excluded.description,"
                    " enabled=1, updated_at=excluded.updated_at",
                    (ep.id, ep.owner, ep.url, ep.secret, json.dumps(list(ep.events)), json.dumps(list(ep.sources)),
                     ep.description, now, now))
            keep = [ep.id for ep in endpoints]
            marks = ",".join("?" * len(keep))
            self._db.execute(
                "UPDATE webhook_endpoints SET enabled = 0, updated_at = ? WHERE managed_by = 'config'"
                + (f" AND id NOT IN ({marks})" if keep else ""), (now, *keep))

    # -- outbox ----------------------------------------------------------------------------

    def enqueue(self, rows: Iterable[NewDelivery]) -> int:
        rows = [(*r, DeliveryStatus.PENDING.value, r[6]) for r in rows]
        if not rows:
            return 0
        with self._lock, Tx(self._db):
            self._db.executemany(
                "INSERT INTO webhook_deliveries (endpoint_id, job_id, event_id, seq, type, body, created_at,"
                " status, next_attempt_at) VALUES (?,?,?,?,?,?,?,?,?)", rows)
        return len(rows)

    def chain_heads(self, per_endpoint: int, node_id: str) -> ChainHeads:
        """The oldest pending row of each (endpoint, job) chain of an enabled endpoint that no
        other node holds a live lease on: at most `per_endpoint` per endpoint, soonest due first,
        interleaved across endpoints (every endpoint's first, then every second, ...); how many
        chains are pending in all; and when the soonest foreign lease runs out.

        Capped per endpoint, not overall: one key's thousand stuck chains must not crowd
        another key's fresh event out of the scheduler's view."""
        now = time.time()
        with self._lock:
            chains = self._db.execute(
                "SELECT COUNT(*) AS chains, MIN(leased_until) AS soonest FROM (SELECT MAX(CASE WHEN"
                f" {_FOREIGN_LEASE} THEN lease_until END) AS leased_until FROM webhook_deliveries"
                " WHERE status = 'pending' GROUP BY endpoint_id, job_id)", (node_id, now)).fetchone()
            rows = self._db.execute(
                "SELECT * FROM (SELECT d.*, ROW_NUMBER() OVER (PARTITION BY d.endpoint_id"
                " ORDER BY d.next_attempt_at, d.id) AS rn"
                " FROM webhook_deliveries d JOIN (SELECT MIN(id) AS id,"
                f" MAX(CASE WHEN {_FOREIGN_LEASE} THEN 1 ELSE 0 END) AS leased FROM webhook_deliveries"
                " WHERE status = 'pending' GROUP BY endpoint_id, job_id) h ON d.id = h.id AND h.leased = 0"
                " JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.enabled = 1)"
                " WHERE rn <= ? ORDER BY rn, next_attempt_at, id", (node_id, now, per_endpoint)).fetchall()
        soonest = chains["soonest"]
        return ChainHeads([_row_delivery(r) for r in rows], chains["chains"],
                          None if soonest is None else max(0.0, soonest - now))

    def lease_head(self, endpoint_id: str, job_id: str, node_id: str, lease_s: float) -> Delivery | None:
        """Lease the chain's head (see bridge/stores/webhooks.py), or None."""
        now = time.time()
        with self._lock, Tx(self._db):
            r = self._db.execute(
                "UPDATE webhook_deliveries SET lease_node = ?, lease_until = ? WHERE id = (SELECT MIN(id)"
                " FROM webhook_deliveries WHERE status = 'pending' AND endpoint_id = ? AND job_id = ?)"
                " AND NOT EXISTS (SELECT 1 FROM webhook_deliveries WHERE status = 'pending' AND endpoint_id = ?"
                f" AND job_id = ? AND {_FOREIGN_LEASE}) RETURNING *",
                (node_id, now + lease_s, endpoint_id, job_id, endpoint_id, job_id, node_id, now)).fetchone()
        return _row_delivery(r) if r else None

    def record_attempt(self, delivery_id: int, node_id: str, *, status: DeliveryStatus, http_status: int | None,
                       error: str | None, next_attempt_at: float, at: float) -> bool:
        with self._lock, Tx(self._db):
            return self._db.execute(
                "UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1, last_attempt_at = ?,"
                " last_status = ?, last_error = ?, next_attempt_at = ?,"
                " delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END,"
                " lease_node = NULL, lease_until = NULL WHERE id = ? AND lease_node = ?",
                (status.value, at, http_status, error, next_attempt_at, status.value, at, delivery_id,
                 node_id)).rowcount > 0

    def release_leases(self, node_id: str) -> int:
        with self._lock, Tx(self._db):
            return self._db.execute("UPDATE webhook_deliveries SET lease_node = NULL, lease_until = NULL"
                                    " WHERE lease_node = ?", (node_id,)).rowcount

    def list_deliveries(self, endpoint_id: str, status: str | None = None, job_id: str | None = None,
                        limit: int = 50, before: int | None = None) -> list[Delivery]:
        """Newest first; `before` is the id to page below."""
        where, args = ["endpoint_id = ?"], [endpoint_id]
        if status:
            where.append("status = ?")
            args.append(status)
        if job_id:
            where.append("job_id = ?")
            args.append(job_id)
        if before is not None:
            where.append("id < ?")
            args.append(before)
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM webhook_deliveries WHERE {' AND '.join(where)}"
                                    " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [_row_delivery(r) for r in rows]

    def get_delivery(self, endpoint_id: str, delivery_id: int) -> Delivery | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM webhook_deliveries WHERE id = ? AND endpoint_id = ?",
                                 (delivery_id, endpoint_id)).fetchone()
        return _row_delivery(r) if r else None

    def redeliver(self, endpoint_id: str, delivery_ids: list[int] | None = None) -> int:
        """Back to pending with a fresh retry period: the given rows (any status), or every dead
        row of the endpoint. A row keeps its id, so it goes out before its job's later events."""
        now = time.time()
        sql = ("UPDATE webhook_deliveries SET status = 'pending', attempts = 0, created_at = ?, next_attempt_at = ?"
               " WHERE endpoint_id = ?")
        args: list[Any] = [now, now, endpoint_id]
        if delivery_ids is None:
            sql += " AND status = 'dead'"
        else:
            sql += f" AND id IN ({','.join('?' * len(delivery_ids))})"
            args.extend(delivery_ids)
        if delivery_ids == []:
            return 0
        with self._lock, Tx(self._db):
            return self._db.execute(sql, args).rowcount

    def retry_now(self, endpoint_id: str) -> int:
        """Pending rows waiting out a backoff become due now (the receiver is back: why wait)."""
        now = time.time()
        with self._lock, Tx(self._db):
            return self._db.execute("UPDATE webhook_deliveries SET next_attempt_at = ? WHERE endpoint_id = ?"
                                    " AND status = 'pending' AND next_attempt_at > ?", (now, endpoint_id, now)).rowcount

    def job_chain(self, job_id: str, endpoint_id: str) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM webhook_deliveries WHERE job_id = ? AND endpoint_id = ?"
                                    " ORDER BY id", (job_id, endpoint_id)).fetchall()
        return [_row_delivery(r) for r in rows]

    def prune(self, older_than: float) -> int:
        with self._lock, Tx(self._db):
            return self._db.execute(
                "DELETE FROM webhook_deliveries WHERE status != 'pending' AND COALESCE(delivered_at, last_attempt_at,"
                " created_at) < ?", (older_than,)).rowcount

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) AS n FROM webhook_deliveries GROUP BY status").fetchall()
        return {r["status"]: r["n"] for r in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
