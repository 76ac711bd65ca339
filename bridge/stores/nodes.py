"""The node store's interface: which nodes share the database, and which live sessions each runs.

Several callbridge nodes on one database (docs/cluster.md) each keep a row in `nodes`, refreshed
every `cluster.heartbeat_s`; a row older than `cluster.node_ttl_s` is a dead node, and a surviving
node `take_over`s its live jobs. `live_sessions` holds one row per admitted session on any node,
so the per-key session limit counts every node's sessions, not only the local ones.

The deciding methods (`open_session`, `take_over`) are one transaction each whose check and
write cannot interleave with another node's: SQLite gets that from BEGIN IMMEDIATE; PostgreSQL
serializes `open_session` per owner with an advisory transaction lock (an owner may be
`jwt:<sub>`, with no key row to lock) and `take_over` with a conditional DELETE of the node row,
which exactly one of several racing survivors gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["DEAD_NODE_REASON", "Node", "NodeStore", "SessionLimitReached", "TakeOver"]

DEAD_NODE_REASON = "the node running this job stopped sending heartbeats"


class SessionLimitReached(Exception):
    """The owner already has `live` sessions on all nodes together, at or over the limit."""

    def __init__(self, live: int, limit: int) -> None:
        super().__init__(f"{live} sessions already live (limit {limit})")
        self.live = live
        self.limit = limit


@dataclass(frozen=True)
class Node:
    id: str
    url: str
    started_at: float
    heartbeat_at: float
    draining: bool = False

    def expired(self, ttl_s: float, now: float) -> bool:
        """Dead: its last heartbeat is older than `ttl_s` (`take_over` checks it again, in its transaction)."""
        return self.heartbeat_at < now - ttl_s

    def to_dict(self, now: float) -> dict[str, Any]:
        """For /healthz: how long since its last heartbeat, and whether it takes new sessions."""
        return {"id": self.id, "url": self.url, "age_s": round(max(0.0, now - self.heartbeat_at), 1),
                "state": "draining" if self.draining else "up"}


@dataclass(frozen=True)
class TakeOver:
    """What taking over one dead node did: the live jobs it failed (their segments and audio
    path kept) and the live-session rows it removed."""

    node_id: str
    failed_jobs: list[str]
    sessions_removed: int


class NodeStore(Protocol):
    async def heartbeat(self, node_id: str, url: str, started_at: float, draining: bool = False,
                        now: float | None = None) -> bool:
        """Insert or refresh this node's row (heartbeat_at = `now`, default the clock); True when
        the row was there (refreshed), False when it was inserted."""

    async def list_nodes(self) -> list[Node]:
        """Every node row, oldest start first."""


    async def take_over(self, node_id: str, ttl_s: float, reason: str = DEAD_NODE_REASON,
                        now: float | None = None) -> TakeOver | None:
        """In one transaction: if `node_id`'s row is still expired (older than `ttl_s`) remove it,
        mark its live jobs failed (error INTERNAL `reason`, duration at least its last final's end,
        segments and audio path kept) and delete its live-session rows. None when the row is gone
        or fresh again (another survivor took it over first, or the node came back)."""

    async def remove_node(self, node_id: str) -> None:
        """A clean stop: the node's row goes (it has no live sessions left)."""

    async def open_session(self, job_id: str, owner: str, node_id: str, limit: int | None,
                           now: float | None = None) -> None:
        """Count `owner`'s live sessions on every node and, under `limit` (None: no limit), add
        this one, in one transaction; SessionLimitReached otherwise."""

    async def end_session(self, job_id: str) -> None:
        """The session is over (or was never opened): remove its row. Idempotent."""

    async def session_jobs(self) -> set[str]:
        """The job ids of every live-session row, on any node (the orphaned-reservation sweep)."""

    async def clear_sessions(self, node_id: str) -> int:
        """At a node's start: its rows are from before a restart; remove them, returning how many."""

    async def close(self) -> None: ...
