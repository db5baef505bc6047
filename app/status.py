"""What the console shows about the cluster (`GET /v1/status`): each replica's readiness, its
endpoints (one per worker process) and their queues, its recent call latency, its decoded answers
and its patience, as a small JSON body polled once a second.

The hot path only appends (app/measures.py); percentiles are computed when the status is asked for,
over the calls that ended in the last `WINDOW_S` seconds, so polling costs the serving path nothing
but the poll itself.
"""

from __future__ import annotations

import time
from typing import Any

from app.measures import WINDOW_S
from app.replicas import HEDGE
from app.state import Gateway


def _role(gw: Gateway, name: str) -> str:
    if name == HEDGE:
        return "hedge"
    return "coded" if name in gw.group.coded else "member"


def health_window(gw: Gateway) -> dict[str, float]:
    """How the replicas are checked, and the longest a replica that stops answering stays counted
    ready: a ping on its channel each interval (+20% jitter), missed when its answer does not come
    within the time-out, and `failure_threshold` missed pings in a row."""
    s = gw.settings
    window = s.health_failure_threshold * (s.health_interval_s * 1.2 + s.health_timeout_s)
    return {
        "interval_s": s.health_interval_s,
        "timeout_s": s.health_timeout_s,
        "failure_threshold": s.health_failure_threshold,
        "window_s": round(window, 2),
    }


def resolutions(gw: Gateway, name: str) -> dict[str, Any] | None:
    """Which resolutions a replica's worker serves and why, as it measured them (issue 31): `live`
    indices, cost ratios (coarse ms / float32 ms) at batch 1 and at its typical batch, the reason
    per resolution ("int8/x86 1.90× float32 at batch 1: skipped ..."); None until one connected."""
    report = gw.replicas.resolutions(name)
    if report is None or "live" not in report:
        return report
    keys = ("live", "batch_1", "typical_batch", "typical", "kernels", "reasons", "margin", "policy")
    return {key: report.get(key) for key in keys}


def refinement(gw: Gateway) -> dict[str, Any]:
    """Every member's and coded replica's `resolutions`: what model metadata and configuration list."""
    return {name: resolutions(gw, name) for name in [*gw.group.members, *gw.group.coded]}


def status_body(gw: Gateway) -> dict[str, Any]:
    """The cluster as the console shows it; every number is the gateway's own (no worker is called)."""
    health, fanout, activity = gw.health, gw.fanout, gw.fanout.activity
    now = time.monotonic()
    reasons = health.reasons()
    replicas = []
    for name, ready in health.ready.items():
        role = _role(gw, name)
        entry: dict[str, Any] = {
            "name": name,
            "role": role,
            "ready": ready,
            "reason": reasons.get(name),
            "circuit_open": name in health.unreachable,
            "endpoints": health.endpoints(name),
            "resolutions": resolutions(gw, name),
            **activity.recent(name, now),
        }
        if role == "member":
            entry["decoded"] = activity.decoded[name]
            entry["patience_ms"] = round(fanout.patience.budget_s(name) * 1000, 2) if fanout.patient else None
        replicas.append(entry)
    return {
        "group": gw.group.name,
        "version": gw.group.version,
        "ready": health.is_ready(),
        "draining": health.draining,
        "decode_policy": gw.settings.decode_policy,
        "health": health_window(gw),
        "window_s": WINDOW_S,
        "inflight": gw.admission.inflight,
        "open_streams": gw.admission.open_streams,
        "finals": activity.finals,
        "approximate_finals": activity.approximate,
        "replicas": replicas,
    }
