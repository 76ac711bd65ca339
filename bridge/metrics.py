"""Prometheus metrics of one service: counters it increments, gauges and histograms read at scrape.

A registry per Service (not prometheus_client's global one) so tests and several services in
one process do not share counts. The recognizer pool keeps its own cumulative histograms; they
are exported as they are at scrape time rather than double-booked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from bridge.admission import Headroom
    from bridge.service import Service

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, service: "Service") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sessions = Counter("callbridge_sessions", "Sessions (jobs) started", ["source"], registry=self.registry)
        self.errors = Counter("callbridge_errors", "Sessions ended by a protocol error, by code", ["code"],
                              registry=self.registry)
        self.audio_seconds = Counter("callbridge_audio_seconds", "Audio received, seconds per channel summed",
                                     ["source"], registry=self.registry)
        self.auth_failures = Counter("callbridge_auth_failures", "Refused credentials", ["code"],
                                     registry=self.registry)
        self.webhook_attempts = Counter("callbridge_webhook_attempts", "Webhook delivery attempts, by result"
                                        " (delivered, failed = will retry, dead)", ["result"], registry=self.registry)
        self.capacity_refused = Counter("callbridge_capacity_refused", "New sessions refused for lack of decode "
                                        "capacity, by ingress", ["source"], registry=self.registry)
        self.sessions_refused = Counter("callbridge_sessions_refused", "New sessions refused at admission (shutdown, "
                                        "disk, session limit, capacity, credits), by ingress and code",
                                        ["source", "code"], registry=self.registry)
        self.registry.register(_LiveCollector(service))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    def __init__(self, service: "Service") -> None:
        self.service = service

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        g = GaugeMetricFamily("callbridge_sessions_active", "Live sessions", labels=["source"])
        by_source: dict[str, int] = {}
        for call in svc.calls.calls.values():
            by_source[call.job.source.value] = by_source.get(call.job.source.value, 0) + 1
        for src, n in sorted(by_source.items()):
            g.add_metric([src], n)
        yield g
        yield GaugeMetricFamily("callbridge_legs_active", "Live call legs (one recognizer each)", value=svc.calls.legs)
        yield GaugeMetricFamily("callbridge_ready", "1 once the model is loaded", value=1 if svc.ready else 0)
        yield GaugeMetricFamily("callbridge_draining", "1 while shutting down", value=1 if svc.draining else 0)
        bus = svc.bus.health()
        yield GaugeMetricFamily("callbridge_bus_connected", "1 while the event bus is reachable (always, in-process)",
                                value=1 if bus.connected else 0)
        yield GaugeMetricFamily("callbridge_bus_buffered", "Events waiting to be sent to the shared bus",
                                value=bus.buffered)
        yield GaugeMetricFamily("callbridge_bus_dropped", "Events the shared bus buffer gave up (full), partials "
                                "included", value=bus.dropped)
        if svc.webhooks is not None:
            wh = svc.webhooks.stats()
            yield GaugeMetricFamily("callbridge_webhook_pending_chains",
                                    "Jobs x endpoints with deliveries waiting (as of the worker's last look)",
                                    value=wh["pending_chains"])
            yield GaugeMetricFamily("callbridge_webhook_in_flight", "Webhook POSTs in flight", value=wh["in_flight"])
            yield GaugeMetricFamily("callbridge_webhook_breakers_open", "Webhook endpoints whose circuit breaker is "
                                    "open or probing", value=wh["breakers_open"])
        if svc.sip is not None:
            st = svc.sip.stats()
            alive = GaugeMetricFamily("callbridge_sip_workers_alive", "SIP worker processes connected")
            alive.add_metric([], sum(1 for w in st["workers"] if w["alive"]))
            yield alive
            yield GaugeMetricFamily("callbridge_sip_worker_restarts", "SIP worker restarts since start",
                                    value=sum(w["restarts"] for w in st["workers"]))
            rej = GaugeMetricFamily("callbridge_sip_rejected", "INVITEs and requests refused by the dispatcher, by status",
                                    labels=["status"])
            for code, n in sorted((st.get("dispatcher") or {}).get("rejected", {}).items()):
                rej.add_metric([str(code)], n)
            yield rej
            d = st.get("dispatcher") or {}
            yield GaugeMetricFamily("callbridge_sip_invites", "INVITEs received on the public SIP port",
                                    value=d.get("invites", 0))
            yield GaugeMetricFamily("callbridge_sip_tcp_connections", "SIP TCP connections open",
                                    value=d.get("tcp_connections", 0))
            yield GaugeMetricFamily("callbridge_sip_tcp_refused", "SIP TCP connections closed at once (over a limit)",
                                    value=d.get("tcp_refused", 0))
        if svc.admission is not None:
            yield from _headroom(svc.admission.headroom())
        if svc.pool is None:
            return
        stats = svc.pool.stats()
        yield GaugeMetricFamily("callbridge_pool_contexts", "whisper.cpp contexts", value=stats["size"])
        yield GaugeMetricFamily("callbridge_pool_busy", "Contexts decoding now", value=stats["busy"])
        q = GaugeMetricFamily("callbridge_queue_depth", "Decodes waiting for a context", labels=["kind"])
        for kind, n in stats["queue_depth"].items():
            q.add_metric([kind], n)
        yield q
        yield from _histograms("callbridge_decode_seconds", "whisper.cpp decode time", stats["decode_seconds"])
        yield from _histograms("callbridge_queue_wait_seconds", "Time a decode waited for a context",
                               stats["queue_wait_seconds"])


def _headroom(h: "Headroom") -> Iterator[Metric]:
    yield GaugeMetricFamily("callbridge_capacity_legs", "Recognizer legs admitted at most (capacity.max_legs, or "
                            "contexts x legs per context, which follows the decode speed)", value=h.legs_capacity)
    yield GaugeMetricFamily("callbridge_capacity_decode_seconds_per_audio_second",
                            "What one second of final audio costs a decode context (calibration, then finals; "
                            "NaN: not measured)",
                            value=h.decode_s_per_audio_s if h.decode_s_per_audio_s is not None else float("nan"))
    yield GaugeMetricFamily("callbridge_capacity_legs_free", "Legs a new session may still take", value=h.legs_free)
    yield GaugeMetricFamily("callbridge_capacity_admitting", "1 while new sessions are admitted, 0 while refused",
                            value=1 if h.admitting else 0)
    yield GaugeMetricFamily("callbridge_capacity_final_latency_p95_seconds",
                            "p95 of finals' time in the decode pool over capacity.window_s (NaN: none decoded)",
                            value=h.final_latency_p95_s if h.final_latency_p95_s is not None else float("nan"))
    yield GaugeMetricFamily("callbridge_capacity_final_latency_bound_seconds",
                            "capacity.max_final_latency_s: above it new sessions are refused", value=h.max_final_latency_s)
    yield GaugeMetricFamily("callbridge_capacity_oldest_final_wait_seconds", "Age of the oldest final still queued",
                            value=h.oldest_final_wait_s)
    yield GaugeMetricFamily("callbridge_capacity_final_utilization",
                            "Share of the decode contexts' time spent on finals over capacity.window_s",
                            value=h.final_utilization)


def _histograms(name: str, doc: str, by_kind: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    h = HistogramMetricFamily(name, doc, labels=["kind"])
    for kind, snap in by_kind.items():
        buckets = [("+Inf" if b == "inf" else b, n) for b, n in snap["buckets"].items()]
        h.add_metric([kind], buckets, snap["sum"])
    yield h
