"""What each resolution costs on this machine, and which coarse resolutions are live (issue 31).

Every resolution is timed at every batch size the worker serves (1 and the powers of two up to
max_batch) in the compute thread: at warm-up, then one pass at a time whenever the batcher is idle
(workers/batcher.py), so a request waits behind at most one timing pass. A coarse resolution is
live only while the median of its recent timings at the typical batch is below the float32 pass's
by more than the timing noise; a resolution that is not live is skipped (docs/refinement.md,
"Where refinement pays"). The int8 engine is re-timed the same way and changed when another one is
measurably faster.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

WINDOW = 9  # timings kept per (resolution, batch): their median is the cost
MIN_SAMPLES = 2  # fewer timings than this decide nothing (the warm-up leaves 2 after its cold first pass)
MIN_MARGIN = 0.05  # a coarse pass must be at least 5% cheaper than float32, however quiet the machine
MAX_MARGIN = 0.9
ENGINE_SAMPLES = 5  # an engine change waits for this many timings of each engine (a change re-packs weights)
Z = 2.0  # ... and cheaper by two standard errors of the ratio of the two medians
MEDIAN_SE = 1.4826 * 1.2533  # σ ≈ 1.4826 MAD; the median of n normal timings has SE ≈ 1.2533 σ / √n
ROWS_WEIGHT = 0.05  # weight of each step in the running mean of rows per step (the typical batch)

Probe = tuple[int | str, int]  # (resolution index, or an int8 engine's name; batch rows)


def _spread(samples: deque[float], middle: float) -> float:
    """Relative median absolute deviation: robust to the one pass another process interrupted."""
    return statistics.median(abs(s - middle) for s in samples) / middle if middle > 0 else 0.0


def margin(a: deque[float], a_mid: float, b: deque[float], b_mid: float) -> float:
    """How much cheaper one median timing must be than another to be cheaper beyond the noise: Z
    standard errors of their ratio, from each side's spread (relative MAD) and count, within
    [MIN_MARGIN, MAX_MARGIN]."""
    se = MEDIAN_SE * math.hypot(_spread(a, a_mid) / math.sqrt(len(a)), _spread(b, b_mid) / math.sqrt(len(b)))
    return min(MAX_MARGIN, max(MIN_MARGIN, Z * se))


class ResolutionCosts:
    """Timings per (resolution, batch) and engine, and the decisions drawn from them. `live`,
    `first_live` and `next_live` are read by the batcher on every submit and step (plain lists)."""

    def __init__(self, kernels: list[str], sizes: list[int], measured: bool = True) -> None:
        self.kernels = list(kernels)  # what runs each resolution ("int8/x86", "float32")
        self.resolutions = len(kernels)
        self.sizes = sizes
        self.measured = measured  # False: every resolution is live (COINSERVE_WORKER_COARSE=always)
        self.samples: dict[Probe, deque[float]] = {
            (i, s): deque(maxlen=WINDOW) for s in sizes for i in range(self.resolutions)
        }
        self.engines: dict[str, deque[float]] = {}  # int8 engine → ms of its pass at the typical batch
        last = self.resolutions - 1
        self.live = [True] * self.resolutions
        self.first_live = list(range(self.resolutions))  # the first live resolution at or after i
        self.next_live = [min(i + 1, last) for i in range(self.resolutions)]  # the next live one after i
        self.reasons = ["not measured yet"] * last + ["float32: always served"]
        self.margin = MIN_MARGIN
        self.rows_mean = 1.0
        self.typical = 1
        self.version = 0  # rises whenever `report()` would say something new
        self._cursor = 0

    # recording -----------------------------------------------------------------------------------
    def record(self, probe: Probe, ms: float) -> None:
        samples = self.samples.get(probe)
        if samples is None:
            samples = self.samples[probe] = deque(maxlen=WINDOW)
        samples.append(ms)

    def record_engine(self, engine: str, ms: float) -> None:
        self.engines.setdefault(engine, deque(maxlen=WINDOW)).append(ms)

    def observe_rows(self, rows: int) -> None:
        self.rows_mean += ROWS_WEIGHT * (rows - self.rows_mean)

    def forget(self, indices: list[int]) -> None:
        """These resolutions now run on other kernels: their timings say nothing any more."""
        for (key, _), samples in self.samples.items():
            if key in indices:
                samples.clear()
        self.engines = {e: deque(maxlen=WINDOW) for e in self.engines}

    def median(self, key: int | str, size: int) -> float | None:
        samples = self.engines.get(str(key)) if isinstance(key, str) else self.samples.get((key, size))
        return statistics.median(samples) if samples and len(samples) >= MIN_SAMPLES else None

    def ratio(self, index: int, size: int) -> float | None:
        coarse, final = self.median(index, size), self.median(self.resolutions - 1, size)
        return None if coarse is None or not final else round(coarse / final, 3)

    # deciding ------------------------------------------------------------------------------------
    def next_probe(self, engines: list[str]) -> Probe:
        """The next pass to time: every resolution at every batch size in turn (the typical batch and
        batch 1 twice as often), then each int8 engine at the typical batch."""
        order: list[Probe] = [(i, s) for s in [self.typical, 1, *self.sizes] for i in range(self.resolutions)]
        order += [(e, self.typical) for e in engines]
        probe = order[self._cursor % len(order)]
        self._cursor += 1
        return probe

    def decide(self) -> bool:
        """Recompute the typical batch, the margin and which resolutions are live; True if anything
        the report says has changed."""
        before = self.report()
        self.typical = max((s for s in self.sizes if s <= max(1.0, self.rows_mean) * 1.5), default=1)
        last = self.resolutions - 1
        final = self.samples[(last, self.typical)]
        for i in range(last):
            self.live[i], self.reasons[i] = self._judge(i, final)
        nxt = last
        for i in range(last, -1, -1):  # first_live[i]: i itself if live, else the next live one
            self.first_live[i] = i if self.live[i] else nxt
            if i < last:
                self.next_live[i] = nxt
            if self.live[i]:
                nxt = i
        changed = self.report() != before
        self.version += changed
        return changed

    def _judge(self, index: int, final: deque[float]) -> tuple[bool, str]:
        kernel = self.kernels[index]
        coarse = self.samples[(index, self.typical)]
        if len(coarse) < MIN_SAMPLES or len(final) < MIN_SAMPLES:
            return self.live[index], f"{kernel}: not measured yet at batch {self.typical}"
        c, f = statistics.median(coarse), statistics.median(final)
        needed = margin(coarse, c, final, f)
        if index == 0:
            self.margin = round(needed, 3)
        ratio = c / f if f > 0 else float("inf")
        cheaper = ratio < 1 - needed
        at = f"{kernel} {ratio:.2f}× float32 at batch {self.typical}"
        if not self.measured:
            return True, f"{at}: served (coarse=always)"
        return cheaper, f"{at}: live" if cheaper else f"{at}: skipped (needs < {1 - needed:.2f}×)"

    def faster_engine(self, current: str | None) -> str | None:
        """Another int8 engine whose pass is cheaper than the current one's by more than the noise."""
        if current is None or current not in self.engines:
            return None
        mid = {e: statistics.median(s) for e, s in self.engines.items() if len(s) >= ENGINE_SAMPLES}
        if current not in mid or len(mid) < 2:
            return None
        best = min(mid, key=mid.__getitem__)
        needed = margin(self.engines[best], mid[best], self.engines[current], mid[current])
        return best if mid[best] < mid[current] * (1 - needed) else None

    # reporting -----------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """What WELCOME, the Pongs after a change, the metadata and the status say: live resolutions
        and cost ratios (coarse ms / float32 ms) at batch 1 and at the typical batch, and why."""
        last = self.resolutions - 1
        return {
            "live": [i for i in range(self.resolutions) if self.live[i]],
            "batch_1": [self.ratio(i, 1) for i in range(last)] + [1.0],
            "typical_batch": self.typical,
            "typical": [self.ratio(i, self.typical) for i in range(last)] + [1.0],
            "kernels": list(self.kernels),
            "margin": self.margin,
            "reasons": list(self.reasons),
            "policy": "measured" if self.measured else "always",
        }
