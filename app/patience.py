"""How long the gateway waits for a member's own answer before it decodes it (DESIGN §4, "exact
whenever it arrives in time").

`eager` decodes as soon as any k of the k + 1 answers are in (ParM's rule: the coded replica then
often replaces a healthy member that was a millisecond slower). `patient` (the default) waits for
each member's exact answer until the member is *late*: its call has run longer than the member's
patience, a high quantile of its recent call latencies plus a small margin, learnt online per
replica, so it follows load and a slow node. A call that is cut short because its member was
decoded is recorded at the time it was cut (a lower bound of its latency): when a node slows down
for good, more than (1 − quantile) of its calls are cut, the quantile climbs and the patience
follows it; a short pause (SIGSTOP) moves it only a little. The deadline overrides patience: at the
deadline the best answers, decoded ones included, are released.

Plain calls (the float32 answer only) and refining ones (every resolution, for a stream or a
deadline) take different times to their final answer, so each kind has its own patience: a stream
is not decoded merely for being slower than the plain calls around it.
"""

from __future__ import annotations

from collections.abc import Callable

from app.hedging import LatencyTracker

# A member's first patience is this many times the batch-1 compute its worker measured while warming
# up, when that is more than the initial patience (`patience_initial_ms`). Measured on 2 shared cores
# (default bundle, five workers and a gateway): a warm batch-1 step takes 0.3-0.7 ms in the worker's
# compute thread, about twice its fastest time once other steps share the cores, and the k + 1 calls
# of one request compute at once on 2 cores (another 2.5 times): 10 covers both. With a fast model the
# initial patience stays (it also covers the channel and event loops, 5-10 ms here); a slow one (40 ms
# a step) is no longer decoded on every call until its first 50 calls are timed.
WARM_FACTOR = 10.0


def _key(member: str, refine: bool) -> str:
    return f"{member} (refine)" if refine else member


class Patience:
    def __init__(
        self, quantile: float, margin_s: float, initial_s: float, on_change: Callable[[str, float], None] | None = None
    ) -> None:
        self.tracker = LatencyTracker(quantile=quantile, initial_s=initial_s)
        self.margin_s = margin_s
        self.on_change = on_change
        self.first: dict[str, float] = {}  # key → its patience before it has history, from its warm-up

    def budget_s(self, member: str, refine: bool = False) -> float:
        """How long a call to `member` may run before its member counts as late."""
        key = _key(member, refine)
        delay = self.tracker.delays.get(key)
        if delay is None:
            delay = self.first.get(key, self.tracker.initial_s)
        return delay + self.margin_s

    def warmed(self, member: str, warm_ms: list[float]) -> None:
        """What a member's worker measured in its warm-up (the fastest batch-1 ms of each resolution):
        its patience until its own calls have been measured is WARM_FACTOR times that (the final
        resolution for a plain call, every resolution for a refining one), never less than the
        initial patience."""
        if not warm_ms:
            return
        initial = self.tracker.initial_s
        self.first[member] = max(initial, WARM_FACTOR * warm_ms[-1] / 1000)
        self.first[_key(member, True)] = max(initial, WARM_FACTOR * sum(warm_ms) / 1000)
        if self.on_change is not None and member not in self.tracker.delays:
            self.on_change(member, self.first[member] + self.margin_s)

    def record(self, member: str, seconds: float, refine: bool = False) -> None:
        key = _key(member, refine)
        before = self.tracker.delays.get(key)
        self.tracker.record(key, seconds)
        after = self.tracker.delays.get(key)
        if self.on_change is not None and not refine and after is not None and after != before:
            self.on_change(member, after + self.margin_s)
