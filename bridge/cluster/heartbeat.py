"""A node's heartbeat, and the look for dead nodes that goes with each beat.

Every `cluster.heartbeat_s` the node refreshes its row in `nodes` (its URL, start time and
whether it drains). With each beat it also looks for rows older than `cluster.node_ttl_s`: a node
that stopped beating that long ago is dead (kill -9, power, network), and this node takes it over
(NodeStore.take_over: one transaction, exactly one survivor wins) and ends its live jobs
(recovery.py). A beat that fails (database down) is logged and retried at the next one; the node
keeps serving its live calls.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bridge.cluster.recovery import Recovery
from bridge.logs import get_logger
from bridge.stores import Node, NodeStore

__all__ = ["STOP_GRACE_S", "Heartbeat"]

STOP_GRACE_S = 30.0

log = get_logger("bridge.cluster")


class Heartbeat:
    def __init__(self, nodes: NodeStore, recovery: Recovery, *, node_id: str, url: str, interval_s: float,
                 ttl_s: float) -> None:
        self.nodes = nodes
        self.recovery = recovery
        self.node_id = node_id
        self.url = url
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.started_at = time.time()
        self.draining = False
        self.reaping = False  # set by begin_reaping, once the webhook dispatcher runs (a take-over queues webhooks)
        self.beats = 0
        self.taken_over: list[str] = []  # dead nodes this node took over, oldest first
        self.known: list[Node] = []  # the node rows as the last look saw them (for /healthz)
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    async def beat(self) -> None:
        """Refresh this node's row now (also at start, before any job, and when draining starts).
        A row gone since the last beat means the others took this node for dead (cut off from the
        database for longer than the TTL): its live jobs were failed and their webhooks sent, though
        its calls went on. Said loudly; the row is back from now on."""
        there = await self.nodes.heartbeat(self.node_id, self.url, self.started_at, self.draining)
        if self.beats and not there:
            log.error("node_was_taken_over", node_id=self.node_id,
                      hint="this node missed heartbeats for longer than cluster.node_ttl_s; its live jobs were "
                           "failed by another node")
        self.beats += 1

    async def reap(self) -> list[str]:
        """Take over every node whose heartbeat expired; returns the ids of those this node took."""
        taken = []
        now = time.time()
        self.known = await self.nodes.list_nodes()
        for node in self.known:
            if node.id == self.node_id or not node.expired(self.ttl_s, now):
                continue  # our own row lagging (a stalled loop) is refreshed by the next beat
            take = await self.nodes.take_over(node.id, self.ttl_s)
            if take is None:
                continue  # another survivor was first, or the node came back
            log.warning("node_dead", dead_node=node.id, url=node.url,
                        last_heartbeat_s=round(time.time() - node.heartbeat_at, 1),
                        failed_jobs=len(take.failed_jobs), sessions_removed=take.sessions_removed)
            self.taken_over.append(node.id)
            taken.append(node.id)
            await self.recovery.after_takeover(node.id, take.failed_jobs)
        return taken

    def view(self, now: float) -> list[dict[str, Any]]:
        """The nodes as the last look saw them, for /healthz."""
        return [n.to_dict(now) for n in self.known]

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cluster-heartbeat")

    async def _run(self) -> None:
        """Beat every interval from the start on (loading a model can take longer than the TTL),
        and look for dead nodes with each beat once `begin_reaping` ran."""
        while True:
            try:
                async with asyncio.timeout(self.interval_s):
                    await self._stopping.wait()
                return
            except TimeoutError:
                pass
            try:
                await self.beat()
            except Exception as e:  # noqa: BLE001 - the next beat tries again
                log.error("heartbeat_failed", node_id=self.node_id, error=repr(e))
            if self.reaping:
                await self._reap_logged()

    async def begin_reaping(self) -> None:
        """Once the sinks a take-over's recovery needs are up (the webhook dispatcher): a first look
        now (a node may have died while no other node ran), then one with every beat."""
        await self._reap_logged()
        self.reaping = True

    async def _reap_logged(self) -> None:
        try:
            await self.reap()
        except Exception as e:  # noqa: BLE001 - the next beat tries again
            log.error("node_reap_failed", node_id=self.node_id, error=repr(e))

    async def drain(self) -> None:
        """Tell the other nodes (and /healthz readers) this node takes no new sessions."""
        self.draining = True
        try:
            await self.beat()
        except Exception as e:  # noqa: BLE001
            log.error("heartbeat_failed", node_id=self.node_id, error=repr(e))

    async def stop(self, *, leave: bool) -> None:
        """Stop beating; `leave` (a clean stop, no live job left) removes this node's row, else it
        stays and expires, and a survivor fails what was left live. A take-over under way is let
        finish (up to STOP_GRACE_S): its jobs are already failed, their webhooks not yet queued."""
        self._stopping.set()
        if self._task is not None:
            done, _ = await asyncio.wait([self._task], timeout=STOP_GRACE_S)
            if not done:
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if leave:
            await self.nodes.remove_node(self.node_id)
