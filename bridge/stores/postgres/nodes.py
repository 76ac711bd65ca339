"""Nodes and live sessions in PostgreSQL: bridge.stores.NodeStore on the shared pool (pool.py).

`open_session` serializes per owner with `pg_advisory_xact_lock(hashtext(owner))` (an owner may be
`jwt:<sub>`, which has no key row to lock), so two nodes admitting one owner's sessions at once
count each other's rows. `take_over` starts with a conditional `DELETE ... RETURNING` of the dead
node's row: of several survivors racing, exactly one deletes it and fails its jobs; the others
find no row and do nothing.
"""

from __future__ import annotations

import time
from typing import Any

from bridge.stores.nodes import DEAD_NODE_REASON, Node, SessionLimitReached, TakeOver
from bridge.stores.postgres.jobs import fail_live
from bridge.stores.postgres.pool import Pool

__all__ = ["PgNodeStore"]

def _row_node(r: dict[str, Any]) -> Node:
    return Node(id=r["id"], url=r["url"], started_at=r["started_at"], heartbeat_at=r["heartbeat_at"],
                draining=bool(r["draining"]))


class PgNodeStore:
    """bridge.stores.NodeStore in PostgreSQL; every method is one transaction on a pooled connection."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def heartbeat(self, node_id: str, url: str, started_at: float, draining: bool = False,
                        now: float | None = None) -> bool:
        async with self._pool.tx() as db:
            # xmax is 0 on a freshly inserted row version, the updating transaction's id on an update
            r = await (await db.execute(
                "INSERT INTO nodes (id, url, started_at, heartbeat_at, draining) VALUES (%s,%s,%s,%s,%s)"
                " ON CONFLICT (id) DO UPDATE SET url = EXCLUDED.url, started_at = EXCLUDED.started_at,"
                " heartbeat_at = EXCLUDED.heartbeat_at, draining = EXCLUDED.draining RETURNING (xmax <> 0) AS there",
                (node_id, url, started_at, time.time() if now is None else now, draining))).fetchone()
        return bool(r["there"])

    async def list_nodes(self) -> list[Node]:
        async with self._pool.tx() as db:
            rows = await (await db.execute("SELECT * FROM nodes ORDER BY started_at, id")).fetchall()
        return [_row_node(r) for r in rows]


    async def take_over(self, node_id: str, ttl_s: float, reason: str = DEAD_NODE_REASON,
                        now: float | None = None) -> TakeOver | None:
        now = time.time() if now is None else now
        async with self._pool.tx() as db:
            # The row lock this DELETE takes makes a racing survivor wait, then find the row gone.
            gone = await (await db.execute("DELETE FROM nodes WHERE id = %s AND heartbeat_at < %s RETURNING id",
                                           (node_id, now - ttl_s))).fetchone()
            if gone is None:
                return None
            failed = await fail_live(db, reason, now, (node_id,))
            removed = (await db.execute("DELETE FROM live_sessions WHERE node_id = %s", (node_id,))).rowcount
        return TakeOver(node_id, failed, removed)

    async def remove_node(self, node_id: str) -> None:
        async with self._pool.tx() as db:
            await db.execute("DELETE FROM nodes WHERE id = %s", (node_id,))

    async def open_session(self, job_id: str, owner: str, node_id: str, limit: int | None,
                           now: float | None = None) -> None:
        async with self._pool.tx() as db:
            await db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (owner,))
            r = await (await db.execute("SELECT COUNT(*) AS n FROM live_sessions WHERE owner = %s",
                                        (owner,))).fetchone()
            if limit is not None and r["n"] >= limit:
                raise SessionLimitReached(int(r["n"]), limit)
            await db.execute("INSERT INTO live_sessions (job_id, owner, node_id, started_at) VALUES (%s,%s,%s,%s)",
                             (job_id, owner, node_id, time.time() if now is None else now))

    async def end_session(self, job_id: str) -> None:
        async with self._pool.tx() as db:
            await db.execute("DELETE FROM live_sessions WHERE job_id = %s", (job_id,))

    async def session_jobs(self) -> set[str]:
        async with self._pool.tx() as db:
            rows = await (await db.execute("SELECT job_id FROM live_sessions")).fetchall()
        return {r["job_id"] for r in rows}

    async def clear_sessions(self, node_id: str) -> int:
        async with self._pool.tx() as db:
            return (await db.execute("DELETE FROM live_sessions WHERE node_id = %s", (node_id,))).rowcount

    async def close(self) -> None:
        await self._pool.release()
