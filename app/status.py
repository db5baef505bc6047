"""What the console shows about the cluster (`GET /v1/status`): each replica's readiness, its recent
call latency, its decoded answers and its patience, as a small JSON body polled once a second.

The hot path only appends: a call's end time and duration to a bounded deque per replica, a count
per decoded member. Percentiles are computed when the status is asked for, over the calls that
ended in the last `WINDOW_S` seconds, so polling costs the serving path nothing but the poll itself.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

import numpy as np

from app.replicas import HEDGE

if TYPE_CHECKING:
    from app.state import Gateway

WINDOW_S = 60.0  # "recent": calls that ended in the last minute
KEPT = 2048  # at most this many recent calls per replica (a busy replica's minute is sampled by its latest)


class Activity:
    """Recent replica calls and decode counts, recorded by the fan-out and the request owner: calls
    that ended with their answer (timed), failed, or were cut short because their answer was no
    longer needed (a coded replica's usual fate when every member answers in time)."""

    def __init__(self) -> None:
        self.calls: dict[str, deque[tuple[float, float]]] = {}  # replica → (ended at, seconds)
        self.errors: dict[str, deque[float]] = {}  # replica → when its failed calls ended
        self.cuts: dict[str, deque[tuple[float, float]]] = {}  # replica → (cut at, seconds it had run)
        self.decoded: Counter[str] = Counter()  # member → finals that carried its decoded answer
        self.finals = 0
        self.approximate = 0

    @staticmethod
    def _append(book: dict[str, deque[Any]], replica: str, item: Any) -> None:
        window = book.get(replica)
        if window is None:
            window = book[replica] = deque(maxlen=KEPT)
        window.append(item)

    def call(self, replica: str, seconds: float) -> None:
        self._append(self.calls, replica, (time.monotonic(), seconds))

    def error(self, replica: str) -> None:
        self._append(self.errors, replica, time.monotonic())

    def cut(self, replica: str, seconds: float) -> None:
        """A call cancelled after `seconds` because its answer was no longer needed (the final came
        first: every member answered, the late one was decoded, the deadline, the client left)."""
        self._append(self.cuts, replica, (time.monotonic(), seconds))

    def final(self, decoded: list[str], approximate: bool) -> None:
        self.finals += 1
        self.approximate += approximate
        self.decoded.update(decoded)

    def recent(self, replica: str, now: float) -> dict[str, Any]:
        """Calls that ended in the last WINDOW_S: answered (their p50/p99), failed, and cut short
        (how many, and the longest any of them had run: a lower bound of a straggler's latency,
        which the answered calls' percentiles cannot show)."""
        since = now - WINDOW_S
        seconds = [s for t, s in self.calls.get(replica, ()) if t >= since]
        cut = [s for t, s in self.cuts.get(replica, ()) if t >= since]
        out: dict[str, Any] = {
            "calls": len(seconds),
            "errors": sum(t >= since for t in self.errors.get(replica, ())),
            "cut": len(cut),
            "cut_max_ms": round(max(cut) * 1000, 2) if cut else None,
            "p50_ms": None,
            "p99_ms": None,
        }
        if seconds:
            p50, p99 = np.percentile(seconds, [50, 99]) * 1000
            out["p50_ms"], out["p99_ms"] = round(p50, 2), round(p99, 2)
        return out


def _role(gw: Gateway, name: str) -> str:
    if name == HEDGE:
        return "hedge"
    return "coded" if name in gw.group.coded else "member"


def health_window(gw: Gateway) -> dict[str, float]:
    """How the replicas are checked, and the longest a replica that stops answering stays counted
    ready: `failure_threshold` timed-out checks in a row, each up to the interval (+20% jitter) plus
    the check's own timeout."""
    s = gw.settings
    window = s.health_failure_threshold * (s.health_interval_s * 1.2 + s.health_timeout_s)
    return {
        "interval_s": s.health_interval_s,
        "timeout_s": s.health_timeout_s,
        "failure_threshold": s.health_failure_threshold,
        "window_s": round(window, 2),
    }


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
        "inflight": gw.inflight,
        "open_streams": gw.open_streams,
        "finals": activity.finals,
        "approximate_finals": activity.approximate,
        "replicas": replicas,
    }
