"""A node's heartbeat, and the look for dead nodes that goes with each beat.

Every `cluster.heartbeat_s` the node refreshes its row in `nodes` (its URL, start time and
whether it drains). With each beat it also looks for rows older than `cluster.node_ttl_s`: a node
that stopped beating that long ago is dead (kill -9, power, network), and this node takes it over
(NodeStore.take_over: one transaction, exactly one survivor wins) and ends its live jobs
(recovery.py). A beat that fails (database down) is logged and retried at the next one; the node
keeps serving its live calls.

A node looks for dead ones only once its own beats have landed without a gap for `node_ttl_s`
(a failed beat, or two beats further apart than twice the interval or half the TTL, is a gap):
after a database outage every row is old, and the first node back must not take the others
over before they had the same chance to beat. Looks run in a task of their own, so a long
take-over never delays this node's own beat. A take-over whose recovery fails (its jobs are
failed, their webhooks not yet queued) is retried with the next looks. A node that finds its own
row gone was taken for dead: its jobs were failed and their webhooks sent, so it ends its calls
(`on_taken_over`) rather than let them run on unaccounted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from bridge.cluster.recovery import Recovery
from bridge.logs import get_logger
from bridge.stores import Node, NodeStore

__all__ = ["STOP_GRACE_S", "Heartbeat"]

STOP_GRACE_S = 30.0

log = get_logger("bridge.cluster")


class Heartbeat:
    def __init__(self, nodes: NodeStore, recovery: Recovery, *, node_id: str, url: str, interval_s: float,
                 ttl_s: float, on_taken_over: Callable[[], None] | None = None) -> None:
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
        self.on_taken_over = on_taken_over
        self.healthy_since: float | None = None  # the first of this node's beats since its last failed (or late) one
        self._last_ok: float | None = None
        self._max_gap_s = max(2 * interval_s, ttl_s / 2)  # beats further apart than this are a gap
        self._unrecovered: list[tuple[str, Sequence[str]]] = []  # take-overs whose recovery failed: retried
        self._task: asyncio.Task | None = None
        self._reaper: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    async def beat(self) -> None:
        """Refresh this node's row now (also at start, before any job, and when draining starts).
        A row gone since the last beat means the others took this node for dead (cut off from the
        database for longer than the TTL): its live jobs were failed and their webhooks sent, though
        its calls went on. Said loudly; the row is back from now on."""
        try:
            there = await self.nodes.heartbeat(self.node_id, self.url, self.started_at, self.draining)
        except BaseException:
            self.healthy_since = None
            raise
        now = time.time()
        # A beat that landed late (it waited for a connection through an outage) is a gap too:
        # the other nodes' beats may have failed meanwhile.
        if self.healthy_since is None or (self._last_ok is not None and now - self._last_ok > self._max_gap_s):
            self.healthy_since = now
        self._last_ok = now
        if self.beats and not there:
            log.error("node_was_taken_over", node_id=self.node_id,
                      hint="this node missed heartbeats for longer than cluster.node_ttl_s; its live jobs were "
                           "failed by another node, so its calls end now")
            if self.on_taken_over is not None:
                self.on_taken_over()
        self.beats += 1

    def may_reap(self, now: float) -> bool:
        """True once this node's beats have landed without a gap for a TTL (see the module doc)."""
        return self.healthy_since is not None and now - self.healthy_since >= self.ttl_s

    async def reap(self) -> list[str]:
        """Take over every node whose heartbeat expired; returns the ids of those this node took."""
        taken: list[str] = []
        now = time.time()
        self.known = await self.nodes.list_nodes()
        await self._retry_recoveries()
        if not self.may_reap(now):
            return taken
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
            try:
                await self.recovery.after_takeover(node.id, take.failed_jobs)
            except Exception as e:  # noqa: BLE001 - its jobs are failed already: only the recovery is left
                log.error("node_recovery_failed", dead_node=node.id, error=repr(e), retry="next look")
                self._unrecovered.append((node.id, take.failed_jobs))
        return taken

    async def _retry_recoveries(self) -> None:
        while self._unrecovered:
            node_id, job_ids = self._unrecovered[0]
            await self.recovery.after_takeover(node_id, job_ids)  # raises: tried again at the next look
            self._unrecovered.pop(0)

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
            if self.reaping and (self._reaper is None or self._reaper.done()):
                self._reaper = asyncio.get_running_loop().create_task(self._reap_logged(), name="cluster-reaper")

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
        for attr in ("_task", "_reaper"):
            task = getattr(self, attr)
            if task is None:
                continue
            done, _ = await asyncio.wait([task], timeout=STOP_GRACE_S)
            if not done:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            setattr(self, attr, None)
        if self._unrecovered:  # their jobs are failed; their webhooks were never queued
            log.error("node_recovery_abandoned", dead_nodes=[n for n, _ in self._unrecovered])
        if leave:
            await self.nodes.remove_node(self.node_id)
