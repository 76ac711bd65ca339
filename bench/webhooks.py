"""Webhook delivery: how far behind the dashboard socket a webhook arrives, and how fast the
outbox drains a backlog.

Run: python -m bench.webhooks [--calls 8] [--seconds 20] [--jobs 50] [--events 200]
     python -m bench.webhooks --only fairness [--hanging 20]
     python -m bench.webhooks --only capacity [--jobs 50] [--events 200] [--endpoint-concurrency N]
     python -m bench.webhooks --only cluster [--jobs 50] [--events 200]

The service runs in this process on embedded defaults (SQLite, the default model), HTTP on a
free loopback port. A webhook receiver (aiohttp) and a `/v1/events` subscriber socket run in
this process too, so both arrival times come from one clock.

1. Live: N real stream sessions at real-time pace (bench.webrtc_capacity's socket callers, in a
   separate process), one webhook endpoint taking every event type (partials included) and one
   subscriber socket. For each event (job_id, seq): webhook arrival minus socket arrival. The
   baseline is the socket, measured in the same run: it is the fastest path an event has out
   of the service.
2. Outage: the same N calls while the receiver is down (connection refused: every chain fails
   and backs off). Then the receiver comes up and the operator calls `POST .../redeliver`
   (retries now instead of after the backoff): time until every queued event is delivered,
   and events per second.
3. Capacity: J synthetic jobs x E events published straight on the bus (no model, no audio):
   outbox writes and delivery throughput of the pipeline alone.
4. Fairness: tenant B (one endpoint) publishes finals on the bus at a steady pace; delay =
   webhook arrival minus publication. Measured with B alone, then while tenant A's jobs go to
   H endpoints that accept and never answer (each attempt hangs for webhooks.timeout_s), on the
   default settings, and again on a service with the per-key/per-endpoint caps and the breaker
   turned off (how one shared pool behaved before them).
5. Cluster: phase 3 on PostgreSQL (a throwaway server, tests/pg.py), first with one node, then
   with two nodes (two services in this process, one database) whose dispatchers share the
   outbox under per-chain leases; the events are published on node A, so node B delivers only
   what it leases from A's rows. Same jobs, events and receiver; rate beside rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bridge.auth import key_id_for
from bridge.events.types import Final

from . import corpus
from .calls import standard_calls
from .metrics import pct
from .report import emit_table
from .service import ADMIT_ALL, BENCH_KEY, running_service
from .webrtc_capacity import run_phase

AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}
TENANT_A = "cbk_bench_tenant_a_0123456789abcdef"  # the tenant whose receivers hang
A_AUTH = {"Authorization": f"Bearer {TENANT_A}"}
# the caps and the breaker out of the way: one pool of `concurrency` shared first come, first served
NO_FAIRNESS = {"webhooks.owner_concurrency": "1000", "webhooks.endpoint_concurrency": "1000",
               "webhooks.breaker_failures": "1000000"}
SECRET = "bench-secret-0123456789abcdef"
ALL_TYPES = ["call_started", "partial", "final", "usage", "dtmf", "call_ended"]


class Receiver:
    """Records when each (job_id, seq) arrived, and checks per-job order."""

    def __init__(self) -> None:
        self.at: dict[tuple[str, int], float] = {}
        self.types: dict[tuple[str, int], str] = {}
        self.last_seq: dict[str, int] = {}
        self.out_of_order = 0
        self.duplicates = 0

    async def hook(self, request: web.Request) -> web.Response:
        ev = json.loads(await request.read())
        if ev.get("type") == "ping":
            return web.Response(text="pong")
        k = (ev["job_id"], ev["seq"])
        if k in self.at:
            self.duplicates += 1
        self.at.setdefault(k, time.monotonic())
        self.types[k] = ev["type"]
        if ev["seq"] < self.last_seq.get(ev["job_id"], 0):
            self.out_of_order += 1
        self.last_seq[ev["job_id"]] = ev["seq"]
        return web.Response(text="ok")

    async def start(self, port: int = 0) -> tuple[str, web.AppRunner]:
        """Listen on `port` (0: a free one); returns the hook URL and the runner that stops it."""
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook", runner  # type: ignore[union-attr]


async def socket_arrivals(url: str, key: str, seen: dict[tuple[str, int], float], stop: asyncio.Event) -> None:
    """Every event of `key`'s jobs on the `/v1/events` socket until `stop`: (job_id, seq) -> arrival
    time, what a webhook's delivery is compared with (here and in tests/test_webhooks.py)."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url.replace("http", "ws", 1) + "/v1/events",
                                   headers={"Authorization": f"Bearer {key}"}) as ws:
            while not stop.is_set():
                try:
                    msg = await asyncio.wait_for(ws.receive(), 0.2)
                except TimeoutError:
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return
                ev = json.loads(msg.data)
                seen.setdefault((ev["job_id"], ev["seq"]), time.monotonic())


async def _wait_all(rx: Receiver, keys: set, timeout: float) -> float:
    t0 = time.monotonic()
    while not keys <= rx.at.keys():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{len(keys - rx.at.keys())} events never arrived")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def live_phase(svc, url: str, hook_url: str, rx: Receiver, calls, wav_dir: Path) -> dict:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(f"{url}/v1/webhooks", json={"url": hook_url, "secret": SECRET, "events": ALL_TYPES}) as r:
            wid = (await r.json())["id"]
        seen: dict[tuple[str, int], float] = {}
        stop = asyncio.Event()
        sub = asyncio.create_task(socket_arrivals(url, BENCH_KEY, seen, stop))
        await asyncio.sleep(0.3)
        res = await run_phase("socket", svc, url, BENCH_KEY, calls, wav_dir)
        await asyncio.sleep(0.5)
        stop.set()
        await sub
        await _wait_all(rx, set(seen), 120)
        async with http.delete(f"{url}/v1/webhooks/{wid}") as r:
            assert r.status == 204
    lags = {t: [] for t in ("final", "partial", "all")}
    for k, t in seen.items():
        d = 1000 * (rx.at[k] - t)
        lags["all"].append(d)
        if rx.types[k] in lags:
            lags[rx.types[k]].append(d)
    return {"events": len(seen), "delivered": sum(1 for k in seen if k in rx.at), "lags": lags, "res": res,
            "finals": len(lags["final"])}


async def backlog_phase(svc, url: str, calls, wav_dir: Path) -> dict:
    rx = Receiver()
    hook_url, runner = await rx.start()
    await runner.cleanup()  # down: the port refuses connections until it is bound again
    port = int(hook_url.rsplit(":", 1)[1].split("/")[0])
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(f"{url}/v1/webhooks", json={"url": hook_url, "secret": SECRET, "events": ALL_TYPES}) as r:
            wid = (await r.json())["id"]
        await run_phase("socket", svc, url, BENCH_KEY, calls, wav_dir)
        await svc.webhooks.flush()
        queued = {(d.job_id, d.seq) for d in await svc.webhooks.store.list_deliveries(wid, "pending", limit=10**6)}
        _, app_runner = await rx.start(port)
        try:
            t0 = time.monotonic()
            async with http.post(f"{url}/v1/webhooks/{wid}/redeliver") as r:
                assert r.status == 202
            await _wait_all(rx, queued, 300)
            took = time.monotonic() - t0
        finally:
            await app_runner.cleanup()
        async with http.delete(f"{url}/v1/webhooks/{wid}") as r:
            assert r.status == 204
    return {"events": len(queued), "seconds": took, "rate": len(queued) / took, "jobs": len(calls),
            "out_of_order": rx.out_of_order, "duplicates": rx.duplicates}


async def capacity_phase(svc, url: str, hook_url: str, rx: Receiver, jobs: int, per_job: int) -> dict:
    from bridge.events.types import Final, Word

    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(f"{url}/v1/webhooks", json={"url": hook_url, "secret": SECRET,
                                                        "events": ["final"]}) as r:
            wid = (await r.json())["id"]
    owner = (await svc.keys.list_keys())[0].id
    words = tuple(Word(w, i * 0.3, i * 0.3 + 0.25, 0.9) for i, w in enumerate("one two three four five six".split()))
    keys = set()
    t0 = time.monotonic()
    for n in range(per_job):
        for j in range(jobs):
            env = svc.bus.publish(f"job_bench_{j:04d}", Final("one two three four five six", words, 0, "caller",
                                                              n * 2.0, n * 2.0 + 1.8, True),
                                  owner=owner, source="stream")
            keys.add((env.job_id, env.seq))
        await asyncio.sleep(0)
    await svc.webhooks.flush()
    written = time.monotonic() - t0
    took = await _wait_all(rx, keys, 600) + written
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.delete(f"{url}/v1/webhooks/{wid}") as r:
            assert r.status == 204
    return {"events": len(keys), "write_s": written, "seconds": took, "rate": len(keys) / took}


class _Hanging:
    """Accepts connections and never answers."""

    def __init__(self) -> None:
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        await reader.read()


async def _tenant_b_delays(svc, hook_url: str, rx: Receiver, owner: str, jobs: int, per_job: int,
                           pace_s: float) -> list[float]:
    """B's finals published one every `pace_s` across `jobs` jobs; ms from publish to arrival."""
    published: dict[tuple[str, int], float] = {}
    tag = f"{time.monotonic_ns():x}"
    for n in range(per_job):
        for j in range(jobs):
            env = svc.bus.publish(f"job_b_{tag}_{j}", Final("one two three", (), 0, "caller", n * 2.0, n * 2.0 + 1.8,
                                                            True), owner=owner, source="stream")
            published[(env.job_id, env.seq)] = time.monotonic()
            await asyncio.sleep(pace_s)
    await _wait_all(rx, set(published), 600)
    return [1000 * (rx.at[k] - t) for k, t in published.items()]


async def fairness_service(data_dir: Path, hanging: int, jobs: int, per_job: int, pace_s: float,
                           **overrides: str) -> dict:
    """One service: tenant B alone, then with tenant A's `hanging` endpoints hanging."""
    rx = Receiver()
    hook_url, runner = await rx.start()
    holder = _Hanging()
    hang_server = await asyncio.start_server(holder.hold, "127.0.0.1", 0)
    hang_url = f"http://127.0.0.1:{hang_server.sockets[0].getsockname()[1]}/hook"
    out: dict = {}
    try:
        async with running_service(data_dir, **{"server.api_keys": f"{BENCH_KEY},{TENANT_A}",
                                                "webhooks.allow_private_targets": "true",
                                                "sip.enabled": "false", **overrides}) as (svc, url):
            cfg = svc.config.webhooks
            out["settings"] = (f"concurrency {cfg.concurrency}, owner_concurrency {cfg.owner_concurrency}, "
                               f"endpoint_concurrency {cfg.endpoint_concurrency}, breaker_failures "
                               f"{cfg.breaker_failures}, timeout_s {cfg.timeout_s:g}")
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{url}/v1/webhooks", headers=AUTH,
                                     json={"url": hook_url, "secret": SECRET, "events": ["final"]}) as r:
                    assert r.status == 201, await r.text()
                for _ in range(hanging):
                    async with http.post(f"{url}/v1/webhooks", headers=A_AUTH,
                                         json={"url": hang_url, "secret": SECRET, "events": ["final"]}) as r:
                        assert r.status == 201, await r.text()
            b, a = key_id_for(BENCH_KEY), key_id_for(TENANT_A)
            out["alone"] = await _tenant_b_delays(svc, hook_url, rx, b, jobs, per_job, pace_s)
            for j in range(jobs):  # A's jobs: a chain per (job, endpoint), every attempt hangs
                for n in range(per_job):
                    svc.bus.publish(f"job_a_{j}", Final("one two three", (), 0, "caller", n * 2.0, n * 2.0 + 1.8, True),
                                    owner=a, source="stream")
            await svc.webhooks.flush()
            t0 = time.monotonic()
            while holder.connections < min(cfg.owner_concurrency, cfg.concurrency, hanging * jobs):
                assert time.monotonic() - t0 < 30, "tenant A's attempts never started"
                await asyncio.sleep(0.01)
            out["hanging_held"] = holder.connections
            out["with_a"] = await _tenant_b_delays(svc, hook_url, rx, b, jobs, per_job, pace_s)
            out["hanging_attempts"] = holder.connections
    finally:
        hang_server.close()
        for w in holder.writers:
            w.close()
        await runner.cleanup()
    return out


async def fairness_phase(tmp: Path, hanging: int) -> tuple[list[list[str]], str]:
    jobs, per_job, pace_s = 5, 20, 0.02  # 100 events over ~2 s
    fair = await fairness_service(tmp / "fair", hanging, jobs, per_job, pace_s)
    unfair = await fairness_service(tmp / "unfair", hanging, jobs, per_job, pace_s, **NO_FAIRNESS)

    def row(name: str, ms: list[float], held: str) -> list[str]:
        return [name, str(len(ms)), f"{pct(ms, 50):.1f}", f"{pct(ms, 95):.1f}", f"{max(ms):.1f}", held]

    return [row("B alone (default settings)", fair["alone"], "-"),
            row(f"B while A's {hanging} endpoints hang (default settings)", fair["with_a"],
                f"{fair['hanging_held']} of {fair['settings'].split(',')[0].split()[1]}"),
            row("B alone (caps and breaker off)", unfair["alone"], "-"),
            row(f"B while A's {hanging} endpoints hang (caps and breaker off)", unfair["with_a"],
                f"{unfair['hanging_held']} of {unfair['settings'].split(',')[0].split()[1]}")], fair["settings"]


def emit_fairness(rows: list[list[str]], settings: str, hanging: int) -> None:
    emit_table(
        "webhooks_fairness",
        f"Webhook fairness: tenant B's delay with and without tenant A's {hanging} hanging endpoints, "
        f"{os.cpu_count()} cores",
        ["tenant B's finals", "events", "delay p50 ms", "p95 ms", "max ms", "slots A's hanging attempts held"],
        rows,
        notes=[f"Delay = webhook arrival at B's receiver - publication on the bus, same process and clock. B: 5 jobs x "
               f"20 finals, one every 20 ms. A: 5 jobs x 20 finals to each of {hanging} endpoints that accept the "
               "connection and never answer.",
               f"Default settings: {settings}. 'Caps and breaker off': owner_concurrency and endpoint_concurrency "
               "1000, breaker_failures 1000000 (one pool shared first come, first served)."],
    )


async def bench(args: argparse.Namespace) -> None:
    calls = standard_calls(args.calls, args.seconds)
    rx = Receiver()
    with tempfile.TemporaryDirectory(prefix="cb-whbench-") as tmp:
        wav_dir = Path(tmp)
        for i, c in enumerate(calls):
            corpus.write_wav(wav_dir / f"call{i}.wav", c.pcm, 16000)
        hook_url, runner = await rx.start()
        try:
            async with running_service(wav_dir / "data", **{"sip.enabled": "false",
                                                             "webhooks.allow_private_targets": "true",
                                                             **ADMIT_ALL}) as (svc, url):
                live = await live_phase(svc, url, hook_url, rx, calls, wav_dir)
                backlog = await backlog_phase(svc, url, calls, wav_dir)
                cap = await capacity_phase(svc, url, hook_url, rx, args.jobs, args.events)
                concurrency = svc.config.webhooks.concurrency
                per_endpoint = svc.config.webhooks.endpoint_concurrency
        finally:
            await runner.cleanup()
        fair_rows, fair_settings = await fairness_phase(wav_dir, args.hanging)
    la = live["lags"]
    rows = [
        [f"live: {args.calls} calls x {args.seconds:.0f} s, all events", f"{live['delivered']}/{live['events']}",
         f"{pct(la['all'], 50):.1f}", f"{pct(la['all'], 95):.1f}", f"{max(la['all']):.1f}", "-"],
        ["  of which finals", f"{live['finals']}", f"{pct(la['final'], 50):.1f}", f"{pct(la['final'], 95):.1f}",
         f"{max(la['final']):.1f}", "-"],
        ["  of which partials", f"{len(la['partial'])}", f"{pct(la['partial'], 50):.1f}",
         f"{pct(la['partial'], 95):.1f}", f"{max(la['partial']):.1f}", "-"],
        [f"outage: {backlog['jobs']} calls while the receiver was down, then redeliver", f"{backlog['events']}",
         "-", "-",
         "-", f"{backlog['rate']:.0f} ({backlog['seconds']:.1f} s)"],
        [f"capacity: {args.jobs} jobs x {args.events} finals on the bus", f"{cap['events']}", "-", "-", "-",
         f"{cap['rate']:.0f} ({cap['seconds']:.1f} s; outbox written in {cap['write_s']:.2f} s)"],
    ]
    emit_table(
        "webhooks",
        f"Webhook delivery, {os.cpu_count()} cores, receiver and subscriber on loopback in the service process",
        ["phase", "events delivered", "lag vs socket p50 ms", "p95 ms", "max ms", "events/s"],
        rows,
        notes=[f"Baseline: the /v1/events socket, in the same run; lag = webhook arrival - socket arrival of the same "
               f"(job_id, seq). Receiver order violations: {rx.out_of_order} live + capacity, {backlog['out_of_order']} "
               f"outage; duplicates: {rx.duplicates + backlog['duplicates']}.",
               f"One chain per (job, endpoint) is delivered one event at a time; at most "
               f"webhooks.endpoint_concurrency = {per_endpoint} chains of one endpoint in flight (of "
               f"webhooks.concurrency = {concurrency}). A backlog of few jobs drains at one round trip per event "
               "per job.",
               f"Live phase recognition: socket WER {100 * live['res']['wer']:.1f} %, final latency p50 "
               f"{live['res']['lat50']:.2f} s (the webhook lag above comes on top of it)."],
    )
    emit_fairness(fair_rows, fair_settings, args.hanging)


async def fairness_only(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="cb-whfair-") as tmp:
        rows, settings = await fairness_phase(Path(tmp), args.hanging)
    emit_fairness(rows, settings, args.hanging)


async def capacity_only(args: argparse.Namespace) -> None:
    rx = Receiver()
    with tempfile.TemporaryDirectory(prefix="cb-whcap-") as tmp:
        hook_url, runner = await rx.start()
        try:
            extra = {"webhooks.endpoint_concurrency": str(args.endpoint_concurrency),
                     "webhooks.owner_concurrency": str(args.endpoint_concurrency)} if args.endpoint_concurrency else {}
            settings = {"sip.enabled": "false", "webhooks.allow_private_targets": "true", **extra}
            async with running_service(Path(tmp) / "data", **settings) as (svc, url):
                cap = await capacity_phase(svc, url, hook_url, rx, args.jobs, args.events)
                cfg = svc.config.webhooks
        finally:
            await runner.cleanup()
    emit_table("webhooks_capacity", f"Webhook pipeline capacity, {os.cpu_count()} cores, receiver on loopback",
               ["phase", "events delivered", "events/s"],
               [[f"capacity: {args.jobs} jobs x {args.events} finals on the bus", f"{cap['events']}",
                 f"{cap['rate']:.0f} ({cap['seconds']:.1f} s; outbox written in {cap['write_s']:.2f} s)"]],
               notes=[f"One endpoint; webhooks.endpoint_concurrency = {cfg.endpoint_concurrency} chains in flight "
                      f"(webhooks.concurrency = {cfg.concurrency}). Order violations {rx.out_of_order}, "
                      f"duplicates {rx.duplicates}."])


async def cluster_only(args: argparse.Namespace) -> None:
    from tests.pg import PgServer  # the tests' throwaway server: Debian postgresql, loopback

    pg = PgServer()
    pg.start()
    rows = []
    try:
        for nodes in (1, 2):
            rx = Receiver()
            hook_url, runner = await rx.start()
            db = pg.new_database()
            settings = {"sip.enabled": "false", "webhooks.allow_private_targets": "true", "storage.url": db}
            try:
                with tempfile.TemporaryDirectory(prefix="cb-whcl-") as tmp:
                    async with contextlib.AsyncExitStack() as stack:
                        svc, url = await stack.enter_async_context(running_service(Path(tmp) / "a", **settings))
                        others = [await stack.enter_async_context(running_service(Path(tmp) / f"n{i}", **settings))
                                  for i in range(1, nodes)]
                        cap = await capacity_phase(svc, url, hook_url, rx, args.jobs, args.events)
                        by_node = [int(n.metrics.webhook_attempts.labels("delivered")._value.get())
                                   for n in [svc] + [o for o, _ in others]]
            finally:
                await runner.cleanup()
            rows.append([str(nodes), f"{cap['events']}", f"{cap['rate']:.0f}", f"{cap['seconds']:.1f}",
                         f"{rx.out_of_order}", f"{rx.duplicates}", " / ".join(map(str, by_node)) or "-"])
    finally:
        pg.stop()
    base = float(rows[0][2])
    for r in rows:
        r.insert(3, f"{float(r[2]) / base:.2f}")
    emit_table("webhooks_cluster", f"Webhook delivery on PostgreSQL, one node vs two sharing the outbox "
               f"({args.jobs} jobs x {args.events} finals, {os.cpu_count()} cores, both nodes in one process)",
               ["nodes", "events delivered", "events/s", "vs 1 node", "seconds", "out of order", "duplicates",
                "delivered by node"], rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--hanging", type=int, default=20, help="tenant A's hanging endpoints (fairness phase)")
    ap.add_argument("--endpoint-concurrency", type=int, default=0,
                    help="capacity phase alone: this per-endpoint (and per-key) cap instead of the configured one")
    ap.add_argument("--only", choices=["fairness", "capacity", "cluster"], help="run this phase alone (no model needed)")
    args = ap.parse_args(argv)
    asyncio.run({"fairness": fairness_only, "capacity": capacity_only,
                 "cluster": cluster_only}.get(args.only, bench)(args))


if __name__ == "__main__":
    main()
