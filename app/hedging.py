"""Per-member latency of recent calls, for the hedged-request baseline (Dean & Barroso, "The Tail at
Scale"): a call still missing after the p95 of its member's latency is re-sent to the hedging
replica, which limits the extra load to about 5% of calls."""

from __future__ import annotations

from collections import deque

import numpy as np

WINDOW = 1000  # recent calls per member
REFRESH = 50  # recompute the quantile every this many new samples
INITIAL_S = 0.020  # before any history: 20 ms
MIN_S = 0.001


class LatencyTracker:
    """A quantile of each replica's last WINDOW call latencies, recomputed every REFRESH samples."""

    def __init__(self, quantile: float = 0.95, initial_s: float = INITIAL_S) -> None:
        self.quantile = quantile
        self.initial_s = initial_s
        self.samples: dict[str, deque[float]] = {}
        self.delays: dict[str, float] = {}
        self.fresh: dict[str, int] = {}

    def record(self, member: str, seconds: float) -> None:
        window = self.samples.setdefault(member, deque(maxlen=WINDOW))
        window.append(seconds)
        self.fresh[member] = self.fresh.get(member, 0) + 1
        if self.fresh[member] >= REFRESH or member not in self.delays:
            self.delays[member] = max(MIN_S, float(np.quantile(window, self.quantile)))
            self.fresh[member] = 0

    def hedge_delay_s(self, member: str) -> float:
        return self.delays.get(member, self.initial_s)
