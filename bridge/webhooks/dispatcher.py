"""The webhook dispatcher: a bus tap fills the durable outbox, a worker delivers it.

Path of one event: `publish` -> tap (matches endpoints from an in-memory copy, never blocks)
-> pending list -> writer task (one transaction per batch) -> outbox row -> delivery worker ->
signed POST. The worker attempts only the head of each (endpoint, job) chain, so a job's events
reach an endpoint in order; different jobs and endpoints go out side by side, up to
`webhooks.concurrency` attempts at once.

A tap is called inside `publish` of this process only, never with an event another node
published on a shared bus, so each node queues only its own events (CLUSTER.md: otherwise N
nodes would queue N copies). A tap rather than a `local=True` subscription: it never lags or
drops, and `flush` knows exactly what it has seen.

Several nodes share one outbox (PostgreSQL): every node's worker delivers from it, and a chain is
attempted by one node at a time under a lease on its head row, taken just before each attempt
and ended by recording it (the protocol: bridge/stores/webhooks.py). A lease outlives one attempt
(`timeout_s` + LEASE_MARGIN_S), so a live node never loses it mid-request; a dead node's leases
run out and another node goes on; a stopping node hands its chains over at once.

Fairness between keys: the pool is handed out round-robin over owners (the key an endpoint
belongs to), at most `owner_concurrency` attempts per owner and `endpoint_concurrency` per
endpoint, and each endpoint has a circuit breaker (bridge/webhooks/breaker.py). So one key's
hanging receivers hold a few slots, then none while their breakers are open, and the rest of
the pool stays free for every other key's deliveries.

Key-owned endpoints are delivered through a client whose resolver refuses non-public
addresses (bridge/webhooks/targets.py); operator endpoints from the config through one that
does not.

A failed attempt (timeout, connection error, non-2xx) is retried after an exponential backoff
with jitter (`Retry-After` on 429/503 is honoured up to the cap). A row that still fails once
`retry_period_s` has passed since it was queued is marked dead and the chain moves on.

Restarts: a graceful stop flushes the pending list before it returns, and pending rows are
simply picked up again by the next start. After a crash (kill -9) the last few milliseconds of
events may not have reached the outbox; for each job the crash left live, `recover` queues the
saved finals an endpoint has not got yet, and the `call_ended` (status failed) that job never
published, so a CRM still sees every final and the end of the call.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from bridge.calls import ended_event
from bridge.events.bus import Envelope, EventBus
from bridge.logs import get_logger
from bridge.stores import JobStore, NewDelivery, WebhookStore
from bridge.webhooks.breaker import BreakerState, CircuitBreaker
from bridge.webhooks.model import ANY_OWNER, Delivery, DeliveryStatus, Endpoint
from bridge.webhooks.signing import sign
from bridge.webhooks.targets import GuardedResolver, TargetBlocked, TargetPolicy

if TYPE_CHECKING:
    from bridge.config import WebhooksConfig

__all__ = ["USER_AGENT", "WebhookDispatcher", "config_endpoints"]

log = get_logger("bridge.webhooks")

USER_AGENT = "callbridge-webhooks/1"
MAX_ERROR_TEXT = 300
# Pending rows are also found without a wake-up: redelivered by the CLI, queued by another node
# (whose chains this node helps deliver), left by a dead one. One cheap read per look.
IDLE_POLL_S = 5.0
# Endpoints registered, changed or deleted through another node's API reach this node's copy
# within this long (this node's own API changes apply at once: `reload`).
ENDPOINT_REFRESH_S = 5.0
LEASE_MARGIN_S = 30.0  # a chain's lease lasts one attempt's timeout plus this (database writes, a busy loop)
DEFAULT_NODE = "local"  # one node; in a cluster the service passes its stable node id (Service.node_id)
PRUNE_EVERY_S = 3600.0
CHAIN_BURST = 50  # a chain delivered back to back gives its slot up after this many, for fairness
PING_UNREACHABLE = "unreachable"  # what a key learns of a ping that got no HTTP answer, whatever the cause
DELIVERY_OFF = "webhook delivery is off (webhooks.enabled = false)"

Chain = tuple[str, str]  # (endpoint id, job id)


def config_endpoints(cfg: WebhooksConfig) -> list[Endpoint]:
    now = time.time()
    return [Endpoint(id=f"wh_cfg_{e['name']}", owner=e.get("owner") or ANY_OWNER, url=e["url"], secret=e["secret"],
                     events=tuple(e["events"]), sources=tuple(e.get("sources") or ()),
                     description=e.get("description", ""), managed_by="config", created_at=now, updated_at=now)
            for e in cfg.endpoints]


def _body(d: dict[str, Any]) -> str:
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False)


class WebhookDispatcher:
    def __init__(self, bus: EventBus, store: WebhookStore, jobs: JobStore, config: WebhooksConfig, *,
                 credits_per_minute: float = 0.0, metrics: Any = None, node_id: str = DEFAULT_NODE,
                 lease_s: float | None = None) -> None:
        self.bus = bus
        self.node_id = node_id  # the owner of this dispatcher's leases; stable across restarts
        self.lease_s = config.timeout_s + LEASE_MARGIN_S if lease_s is None else lease_s
        self.store = store
        self.jobs = jobs
        self.config = config
        self.metrics = metrics
        self.credits_per_minute = credits_per_minute
        self._writing = False
        self._endpoints: dict[str, Endpoint] = {}
        self._pending: list[NewDelivery] = []
        self._wrote = asyncio.Event()  # the writer has something to write
        self._due = asyncio.Event()  # the worker should look at the outbox again
        self._in_flight: dict[Chain, asyncio.Task] = {}
        self._owner_load: Counter[str] = Counter()  # attempts in flight per owner
        self._endpoint_load: Counter[str] = Counter()  # attempts in flight per endpoint
        self._chain_owner: dict[Chain, str] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._next_owner = 0  # round-robin start, moved on each pass
        self.policy = TargetPolicy.from_config(config.allow_private_targets, config.allowed_target_networks)
        self._writer: asyncio.Task | None = None
        self._worker: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None  # key-owned endpoints: guarded resolver
        self._operator_session: aiohttp.ClientSession | None = None  # config endpoints: any address
        self._closing = False
        self._last_prune = 0.0
        self._endpoints_at = 0.0  # when the endpoint copy was last read from the store
        self.pending_chains = 0
        self._ended_queued: set[str] = set()  # recovered jobs whose call_ended `recover` queued

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self, recovered_jobs: Sequence[str] = ()) -> None:
        await self.store.sync_config_endpoints(config_endpoints(self.config))
        await self.reload()
        if recovered_jobs:
            await self.recover(recovered_jobs)
        self.bus.add_tap(self._tap)
        self._writer = asyncio.create_task(self._write_loop(), name="webhooks-writer")
        if self.config.enabled:
            timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
            headers = {"User-Agent": USER_AGENT}
            self._session = aiohttp.ClientSession(
                headers=headers, timeout=timeout,
                connector=aiohttp.TCPConnector(resolver=GuardedResolver(self.policy), limit=0))
            self._operator_session = aiohttp.ClientSession(
                headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
            self._worker = asyncio.create_task(self._deliver_loop(), name="webhooks-worker")

    async def reload(self) -> None:
        """Take endpoint changes (API or config) into the tap's in-memory copy."""
        await self._read_endpoints()
        self._due.set()

    async def _read_endpoints(self) -> None:
        eps = await self.store.list_endpoints()
        self._endpoints = {e.id: e for e in eps}
        self._endpoints_at = time.time()

    async def flush(self) -> None:
        """Wait until every event the tap has seen so far is in the outbox."""
        self._wrote.set()
        while (self._pending or self._writing) and self._writer is not None and not self._writer.done():
            await asyncio.sleep(0.005)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Flush the outbox, give attempts in flight `grace_s`, then cancel the rest and end this
        node's leases (their rows stay pending and go out at another node, or after the next
        start; receivers dedupe on X-Event-Id)."""
        self._closing = True
        self._wrote.set()
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._worker is not None:
            self._due.set()  # the loop sees _closing and returns
            try:
                async with asyncio.timeout(grace_s):
                    await asyncio.shield(self._worker)
            except TimeoutError:
                self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        if self._in_flight:
            await asyncio.wait(list(self._in_flight.values()), timeout=grace_s)
            for t in list(self._in_flight.values()):
                t.cancel()
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        try:  # attempts cut short were not recorded: their chains go on at another node now, not in lease_s
            released = await self.store.release_leases(self.node_id)
            if released:
                log.info("webhook_leases_released", node_id=self.node_id, count=released)
        except Exception as e:  # noqa: BLE001 - the leases run out by themselves
            log.error("webhook_lease_release_failed", node_id=self.node_id, error=repr(e))
        for session in (self._session, self._operator_session):
            if session is not None:
                await session.close()

    def stats(self) -> dict[str, Any]:
        return {"endpoints": sum(1 for e in self._endpoints.values() if e.enabled), "in_flight": len(self._in_flight),
                "pending_chains": self.pending_chains, "unwritten": len(self._pending),
                "breakers_open": sum(b.state is not BreakerState.CLOSED for b in self._breakers.values())}

    @property
    def delivering(self) -> bool:
        """False with webhooks.enabled = false: events are queued, nothing is sent."""
        return self._session is not None

    # -- endpoint health -------------------------------------------------------------------------
    def _breaker(self, endpoint_id: str) -> CircuitBreaker:
        b = self._breakers.get(endpoint_id)
        if b is None:
            b = self._breakers[endpoint_id] = CircuitBreaker(self.config.breaker_failures,
                                                             self.config.breaker_cooldown_s)
        return b

    def circuit(self, endpoint_id: str) -> dict[str, Any]:
        """The endpoint's breaker, for the API (`circuit` of GET /v1/webhooks/{id})."""
        return self._breaker(endpoint_id).to_dict()

    def retry_now(self, endpoint_id: str) -> None:
        """The receiver is said to be back (redeliver): an open breaker probes at once."""
        self._breaker(endpoint_id).reset(time.time())
        self._due.set()

    def forget(self, endpoint_id: str) -> None:
        """A new URL, or the endpoint is gone: its failures say nothing about what comes next."""
        self._breakers.pop(endpoint_id, None)

    # -- into the outbox -------------------------------------------------------------------------
    def _tap(self, env: Envelope) -> None:
        etype = env.event.type.value
        if etype == "call_ended" and env.job_id in self._ended_queued:
            self._ended_queued.discard(env.job_id)
            return
        targets = [e.id for e in self._endpoints.values() if e.wants(etype, env.owner, env.source)]
        if not targets:
            return
        body = _body(env.to_dict())
        event_id = "evt_" + secrets.token_hex(12)
        now = time.time()
        self._pending.extend((ep, env.job_id, event_id, env.seq, etype, body, now) for ep in targets)
        self._wrote.set()

    async def _write_loop(self) -> None:
        """The only writer of new rows, so outbox ids follow publish order."""
        while True:
            await self._wrote.wait()
            self._wrote.clear()
            while self._pending:
                batch = self._pending[:]  # the tap only appends: these stay the first len(batch)
                self._writing = True
                try:
                    await self.store.enqueue(batch)
                except Exception as e:  # noqa: BLE001 - keep the rows and try again shortly
                    log.error("webhook_outbox_write_failed", error=repr(e), unwritten=len(self._pending))
                    if self._closing:
                        return
                    await asyncio.sleep(1.0)
                    continue
                finally:
                    self._writing = False
                del self._pending[:len(batch)]
                self._due.set()
            if self._closing:
                return

    async def recover(self, job_ids: Sequence[str], *, end_published: bool = False) -> None:
        """Jobs a crash left live (this node's at its start, a dead node's at its take-over,
        bridge/cluster/): queue their saved finals an endpoint has not got, and their end.
        `end_published`: the caller publishes their `call_ended` on the bus next, for its
        subscribers; the tap leaves that one out, queued here already (after the finals, and
        numbered after what the endpoint got)."""
        if end_published:
            self._ended_queued.update(job_ids)
        rows: list[NewDelivery] = []
        now = time.time()
        for job_id in job_ids:
            job = await self.jobs.get_job(job_id)
            if job is None:
                continue
            segments = await self.jobs.segments(job_id)
            for ep in self._endpoints.values():
                wants_final = ep.wants("final", job.owner, job.source.value)
                wants_end = ep.wants("call_ended", job.owner, job.source.value)
                if not (wants_final or wants_end):
                    continue
                chain = await self.store.job_chain(job_id, ep.id)
                seq = max((d.seq for d in chain), default=0)
                have = set()
                for d in chain:
                    if d.type == "final":
                        b = json.loads(d.body)
                        have.add((b["channel"], round(b["start"], 3), round(b["end"], 3)))
                if wants_final:
                    for g in sorted(segments, key=lambda s: s.id):
                        if (g.channel, round(g.start, 3), round(g.end, 3)) in have:
                            continue
                        seq += 1
                        d = {**g.final_event(), "job_id": job_id, "seq": seq, "recovered": True}
                        rows.append((ep.id, job_id, "evt_" + secrets.token_hex(12), seq, "final", _body(d), now))
                if wants_end and not any(d.type == "call_ended" for d in chain):
                    seq += 1
                    d = {**ended_event(job, self.credits_per_minute).to_dict(), "job_id": job_id, "seq": seq,
                         "recovered": True}
                    rows.append((ep.id, job_id, "evt_" + secrets.token_hex(12), seq, "call_ended", _body(d), now))
        if rows:
            await self.store.enqueue(rows)
            log.warning("webhooks_recovered", jobs=len(job_ids), deliveries=len(rows))

    # -- out of the outbox -----------------------------------------------------------------------
    async def _deliver_loop(self) -> None:
        while not self._closing:
            self._due.clear()
            if time.time() - self._endpoints_at > ENDPOINT_REFRESH_S:  # other nodes' API changes
                try:
                    await self._read_endpoints()
                except Exception as e:  # noqa: BLE001 - the copy stays as it was; tried again next look
                    log.error("webhook_endpoints_read_failed", error=repr(e))
            free = self.config.concurrency - len(self._in_flight)
            wait_s = IDLE_POLL_S
            if free > 0:
                try:
                    heads, self.pending_chains, lease_wait_s = await self.store.chain_heads(
                        2 * self.config.endpoint_concurrency, self.node_id)
                except Exception as e:  # noqa: BLE001
                    log.error("webhook_outbox_read_failed", error=repr(e))
                    heads, lease_wait_s = [], None
                    wait_s = 1.0
                if lease_wait_s is not None:  # another node's chain: look again when its lease runs out
                    wait_s = min(wait_s, lease_wait_s)
                wait_s = min(wait_s, self._start_due(heads, free, time.time()))
            if time.time() - self._last_prune > PRUNE_EVERY_S:
                self._last_prune = time.time()
                n = await self.store.prune(time.time() - self.config.retention_s)
                if n:
                    log.info("webhook_deliveries_pruned", count=n)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races
            # with the event being set, and the loop then never ends (seen in the restart test)
            try:
                async with asyncio.timeout(max(0.01, wait_s)):
                    await self._due.wait()
            except TimeoutError:
                pass

    def _start_due(self, heads: list[Delivery], free: int, now: float) -> float:
        """Start up to `free` chains among `heads` (due, endpoint enabled, breaker letting them
        through), round-robin over owners within the per-owner and per-endpoint caps; returns
        how long until the soonest head that is not due yet (or a breaker's probe) comes due."""
        wait_s = IDLE_POLL_S
        queues: dict[str, list[tuple[Endpoint, Delivery]]] = {}
        for d in heads:  # already interleaved across endpoints, soonest first within each
            ep = self._endpoints.get(d.endpoint_id)
            if ep is None:  # registered on another node since the last read: read again soon
                self._endpoints_at = 0.0
                wait_s = min(wait_s, 1.0)
                continue
            if (d.endpoint_id, d.job_id) in self._in_flight or not ep.enabled:
                continue
            if d.next_attempt_at > now:
                wait_s = min(wait_s, d.next_attempt_at - now)
                continue
            br = self._breaker(ep.id)
            if not br.ready(now):
                if br.state is BreakerState.OPEN:
                    wait_s = min(wait_s, br.retry_at - now)
                continue
            queues.setdefault(ep.owner, []).append((ep, d))
        owners = sorted(queues)
        if owners:
            k = self._next_owner % len(owners)
            owners = owners[k:] + owners[:k]
            self._next_owner += 1
        while free > 0 and owners:
            for owner in list(owners):
                started = False
                queue = queues[owner]
                while queue and not started:
                    ep, d = queue.pop(0)
                    if self._owner_load[owner] >= self.config.owner_concurrency:
                        queue.clear()
                        break
                    br = self._breaker(ep.id)
                    if self._endpoint_load[ep.id] >= self.config.endpoint_concurrency or not br.ready(now):
                        continue
                    self._launch(ep, d, br)
                    free -= 1
                    started = True
                if not queue:
                    owners.remove(owner)
                if free <= 0:
                    break
        return wait_s

    def _launch(self, ep: Endpoint, d: Delivery, br: CircuitBreaker) -> None:
        chain = (d.endpoint_id, d.job_id)
        br.start(chain)
        self._owner_load[ep.owner] += 1
        self._endpoint_load[ep.id] += 1
        self._chain_owner[chain] = ep.owner
        task = asyncio.create_task(self._drain_chain(ep, d), name=f"webhook-{d.id}")
        self._in_flight[chain] = task
        task.add_done_callback(lambda t, c=chain: self._done(c, t))

    def _done(self, chain: Chain, task: asyncio.Task) -> None:
        self._in_flight.pop(chain, None)
        owner = self._chain_owner.pop(chain, None)
        if owner is not None:
            self._owner_load[owner] -= 1
            self._endpoint_load[chain[0]] -= 1
        if chain[0] in self._breakers:
            self._breakers[chain[0]].release(chain, time.time())
        self._due.set()
        if not task.cancelled() and task.exception() is not None:  # e.g. the database went away
            log.error("webhook_chain_failed", job_id=chain[1], webhook_id=chain[0], error=repr(task.exception()))

    def _backoff(self, attempts: int, retry_after: float | None) -> float:
        cap = self.config.backoff_max_s
        d = min(cap, self.config.backoff_initial_s * 2 ** max(0, attempts - 1))
        d = d / 2 + random.uniform(0, d / 2)  # "equal jitter": never zero, spreads a thundering herd
        if retry_after is not None:
            d = max(d, min(cap, retry_after))
        return d

    async def _post(self, ep: Endpoint, event_id: str, body: bytes, attempt: int
                    ) -> tuple[int | None, str | None, float | None]:
        """One signed POST: (HTTP status or None, error text or None on 2xx, Retry-After seconds).
        A key's endpoint goes through the guarded client, and an IP literal in its URL (which
        no resolver sees) is checked here."""
        session = self._operator_session if ep.managed_by == "config" else self._session
        if session is None:
            return None, DELIVERY_OFF, None
        ts = int(time.time())
        headers = {"Content-Type": "application/json", "X-Event-Id": event_id, "X-Timestamp": str(ts),
                   "X-Signature": sign(ep.secret, ts, body), "X-Webhook-Id": ep.id,
                   "X-Delivery-Attempt": str(attempt)}
        try:
            if session is self._session:
                self._check_literal(ep.url)
            async with session.post(ep.url, data=body, headers=headers, allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    return resp.status, None, None
                text = (await resp.content.read(MAX_ERROR_TEXT)).decode("utf-8", "replace")
                ra = resp.headers.get("Retry-After", "")
                return resp.status, f"HTTP {resp.status}: {text}".strip(), float(ra) if ra.strip().isdigit() else None
        except TimeoutError:
            return None, f"timed out after {self.config.timeout_s:g} s", None
        except TargetBlocked as e:
            return None, _blocked_text(e), None
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, TargetBlocked):
                return None, _blocked_text(e.os_error), None
            return None, f"{type(e).__name__}: {e}"[:MAX_ERROR_TEXT], None
        except (aiohttp.ClientError, OSError, ValueError) as e:
            return None, f"{type(e).__name__}: {e}"[:MAX_ERROR_TEXT], None

    def _check_literal(self, url: str) -> None:
        host = URL(url).raw_host or ""  # as aiohttp parses it: that is the host it connects to
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return  # a name: the guarded resolver checks what it resolves to
        self.policy.check([host])

    async def ping(self, ep: Endpoint) -> dict[str, Any]:
        """Send a signed `ping` event now, outside the outbox, and say whether it was delivered:
        for checking a receiver's URL and signature code before real calls depend on it.

        The answer carries the HTTP status only, never the receiver's body, and one word for
        every failure without a status (refused, reset, timed out, blocked address): a key must
        not be able to use the ping to map or read what the service can reach. The full
        error goes to the log, for the operator."""
        event_id = "evt_" + secrets.token_hex(12)
        body = _body({"type": "ping", "webhook_id": ep.id, "at": round(time.time(), 3)}).encode()
        started = time.time()
        http_status, error, _ = await self._post(ep, event_id, body, 1)
        log.info("webhook_ping", webhook_id=ep.id, http_status=http_status, error=error)
        if error is not None and error != DELIVERY_OFF:
            error = f"HTTP {http_status}" if http_status is not None else PING_UNREACHABLE
        return {"delivered": error is None, "event_id": event_id, "http_status": http_status, "error": error,
                "ms": round((time.time() - started) * 1000)}

    async def _drain_chain(self, ep: Endpoint, head: Delivery) -> None:
        """Lease the chain's head and deliver it, and while that succeeds its next rows, without
        going back to the scan of every chain (one indexed UPDATE per event); stop at a failure,
        a burst, or when another node holds the chain (it leased the head since the scan)."""
        for _ in range(CHAIN_BURST):
            if self._closing:
                return
            d = await self.store.lease_head(head.endpoint_id, head.job_id, self.node_id, self.lease_s)
            if d is None or d.next_attempt_at > time.time():
                return  # a lease on a head not due yet is this node's to use when it is due
            if not await self._attempt(ep, d):
                return
            ep = self._endpoints.get(ep.id) or ep
            if not ep.enabled or self._breaker(ep.id).state is not BreakerState.CLOSED:
                return

    async def _attempt(self, ep: Endpoint, d: Delivery) -> bool:
        """One attempt, recorded; True when delivered."""
        started = time.time()
        http_status, error, retry_after = await self._post(ep, d.event_id, d.body.encode(), d.attempts + 1)
        now = time.time()
        if error is None:
            status, next_at, result = DeliveryStatus.DELIVERED, now, "delivered"
        elif now - d.created_at >= self.config.retry_period_s:
            status, next_at, result = DeliveryStatus.DEAD, now, "dead"
        else:
            status, result = DeliveryStatus.PENDING, "failed"
            next_at = now + self._backoff(d.attempts + 1, retry_after)
        breaker = self._breaker(ep.id)
        was = breaker.state
        breaker.record(error is None, now)
        if breaker.state is not was:  # record() only opens or closes
            log.warning("webhook_breaker_" + breaker.state.value, job_id=d.job_id, webhook_id=ep.id, owner=ep.owner,
                        consecutive_failures=breaker.consecutive_failures, error=error,
                        retry_in_s=round(breaker.retry_at - now, 1) if breaker.state is BreakerState.OPEN else None)
        held = await self.store.record_attempt(d.id, self.node_id, status=status, http_status=http_status,
                                               error=error, next_attempt_at=next_at, at=now)
        if self.metrics is not None:
            self.metrics.webhook_attempts.labels(result).inc()
        fields = dict(job_id=d.job_id, webhook_id=ep.id, delivery_id=d.id, event_type=d.type, seq=d.seq,
                      attempt=d.attempts + 1, http_status=http_status, ms=round((now - started) * 1000))
        if not held:  # this attempt outlived its lease and another node has the row: its result stands
            log.warning("webhook_lease_lost", node_id=self.node_id, result=result, error=error, **fields)
            return False
        if result == "delivered":
            log.debug("webhook_delivered", **fields)
        elif result == "dead":
            log.warning("webhook_dead", error=error, **fields)
        else:
            log.info("webhook_retry", error=error, retry_in_s=round(next_at - now, 2), **fields)
        return result == "delivered"


def _blocked_text(e: TargetBlocked) -> str:
    return (f"address not allowed: {e}; key-owned webhooks reach public addresses only "
            "(the operator can allow more: webhooks.allow_private_targets, webhooks.allowed_target_networks)")
