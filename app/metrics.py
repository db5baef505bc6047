"""Prometheus collectors of the gateway, defined once, on a registry per app (tests build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "coinserve_requests_total", "Requests by endpoint and outcome", ["endpoint", "outcome"], registry=r
        )
        self.time_to_coarse = Histogram(
            "coinserve_time_to_coarse_seconds", "Time to the first complete answer", buckets=_LATENCY, registry=r
        )
        self.time_to_final = Histogram(
            "coinserve_time_to_final_seconds", "Time to the final event", buckets=_LATENCY, registry=r
        )
        self.decoded = Counter(
            "coinserve_decoded_answers_total", "Member answers decoded in a final", ["member"], registry=r
        )
        self.approximate = Counter(
            "coinserve_approximate_finals_total", "Finals that are not exact, by reason", ["reason"], registry=r
        )
        self.replica_latency = Histogram(
            "coinserve_replica_request_duration_seconds",
            "Replica call time to its last useful line",
            ["replica"],
            buckets=_LATENCY,
            registry=r,
        )
        self.replica_errors = Counter(
            "coinserve_replica_errors_total", "Failed replica calls", ["replica", "kind"], registry=r
        )
        self.replica_ready = Gauge(
            "coinserve_replica_ready", "1 when the replica's readiness check passes", ["replica"], registry=r
        )
        self.replica_circuit_open = Gauge(
            "coinserve_replica_circuit_open",
            "1 while calls skip the replica (it refused a connection; cleared by a passing health check)",
            ["replica"],
            registry=r,
        )
        self.patience = Gauge(
            "coinserve_replica_patience_seconds",
            "How long a call to this member may run before its answer is decoded (decode policy patient)",
            ["replica"],
            registry=r,
        )
        self.resolution_cost_ratio = Gauge(
            "coinserve_resolution_cost_ratio",
            "A replica's measured cost of a resolution over its float32 pass at its typical batch (issue 31)",
            ["replica", "resolution"],
            registry=r,
        )
        self.resolution_live = Gauge(
            "coinserve_resolution_live",
            "1 while a replica serves the resolution (measured cheaper than float32, or float32 itself), else 0",
            ["replica", "resolution"],
            registry=r,
        )
        self.hedges = Counter("coinserve_hedged_calls_total", "Member calls re-sent to the hedging replica", registry=r)
        self.final_asks = Counter(
            "coinserve_final_asks_total",
            "Replicas asked again for their float32 answer: they stopped confident but the ensemble was not",
            registry=r,
        )
        self.inflight = Gauge("coinserve_inflight_requests", "Requests being answered", registry=r)
        self.streams = Gauge("coinserve_open_streams", "Open server-sent-event streams", registry=r)
        self.refused = Counter(
            "coinserve_refused_requests_total",
            "Requests refused at admission: limit (429), streams (429), deadline cannot be met (503)",
            ["reason"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "coinserve_event_loop_lag_seconds",
            "How late the gateway's event loop ran a 5 ms timer (sampled every tick)",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.deadline_overrun = Histogram(
            "coinserve_deadline_overrun_seconds",
            "How late after its deadline a request's terminal event was written (0 when on time)",
            buckets=(0.0, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.replica_identity_mismatch = Counter(
            "coinserve_replica_identity_mismatch_total",
            "Health checks whose replica reported another bundle, model or refinement plan than the gateway's",
            ["replica"],
            registry=r,
        )
