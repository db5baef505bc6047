"""Per-replica latency of recent calls: a quantile of the last WINDOW calls, for the hedged-request
baseline (Dean & Barroso, "The Tail at Scale": a call still missing after the p95 of its member's
latency is re-sent to the hedging replica, which limits the extra load to about 5% of calls) and
for the patience of the decoding policy (app/patience.py)."""

from __future__ import annotations

import numpy as np

WINDOW = 1000  # recent calls per replica
REFRESH = 50  # recompute the quantile every this many new samples; no quantile from fewer
INITIAL_S = 0.020  # before enough history: 20 ms
MIN_S = 0.001


class LatencyTracker:
    """A quantile of each key's last WINDOW call latencies, recomputed every REFRESH samples, once
    there are at least REFRESH of them (a quantile of three calls says nothing: `initial_s` until
    then). The samples live in one ring buffer per key, so recording costs a store."""

    def __init__(self, quantile: float = 0.95, initial_s: float = INITIAL_S) -> None:
        self.quantile = quantile
        self.initial_s = initial_s
        self.rings: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.delays: dict[str, float] = {}

    def record(self, key: str, seconds: float) -> None:
        ring = self.rings.get(key)
        if ring is None:
            ring = self.rings[key] = np.empty(WINDOW)
            self.counts[key] = 0
        count = self.counts[key]
        ring[count % WINDOW] = seconds
        self.counts[key] = count = count + 1
        if count % REFRESH == 0:
            self.delays[key] = max(MIN_S, float(np.quantile(ring[: min(count, WINDOW)], self.quantile)))

    def hedge_delay_s(self, key: str) -> float:
        return self.delays.get(key, self.initial_s)

    def samples(self, key: str) -> np.ndarray:
        """The recent latencies of `key`, oldest first."""
        ring, count = self.rings.get(key), self.counts.get(key, 0)
        if ring is None:
            return np.empty(0)
        if count <= WINDOW:
            return ring[:count].copy()
        cut = count % WINDOW
        return np.concatenate([ring[cut:], ring[:cut]])
