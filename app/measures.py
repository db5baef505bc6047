"""The fan-out's own measurements, on the ground floor of app/ (they import nothing above them):
calls in flight and recent completions per replica (admission's wait estimate), how far behind the
event loop runs (the overload guard), and the recent calls and decodes the console shows.

The hot path only appends or counts; everything derived (a wait, a lag, a percentile) is computed
when it is asked for.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WINDOW_S = 60.0  # "recent" for the console: calls that ended in the last minute
KEPT = 2048  # at most this many recent calls per replica (a busy replica's minute is sampled by its latest)


@dataclass
class _Replica:
    in_flight: int = 0
    completions: deque[float] = field(default_factory=deque)  # perf_counter of each completed call
    elapsed: deque[float] = field(default_factory=deque)  # its time from send to answer, when known


class ReplicaLoad:
    """Calls in flight and recent completions per replica, and the wait a new call can expect."""

    def __init__(self, window_s: float = 1.0, min_completions: int = 5) -> None:
        self.window_s = window_s
        self.min_completions = min_completions
        self.replicas: dict[str, _Replica] = {}

    def _of(self, name: str) -> _Replica:
        replica = self.replicas.get(name)
        if replica is None:
            replica = self.replicas[name] = _Replica()
        return replica

    def started(self, name: str) -> None:
        self._of(name).in_flight += 1

    def finished(self, name: str, completed: bool, now: float | None = None, elapsed_s: float | None = None) -> None:
        replica = self._of(name)
        replica.in_flight -= 1
        if completed:
            replica.completions.append(time.perf_counter() if now is None else now)
            if elapsed_s is not None:
                replica.elapsed.append(elapsed_s)

    def expected_wait_s(self, name: str, now: float | None = None) -> float | None:
        """L / X for a new call on `name`, or None without enough recent completions to tell. X is
        what the replica completed in the window, which is its demand, not its capacity, when its
        calls come rarely and in bursts (a coded replica whose calls are held until a member is late
        gets them all at once when a member is paused): so the wait is at most L times the replica's
        recent time per call, the wait of calls answered one after another."""
        replica = self.replicas.get(name)
        if replica is None or replica.in_flight == 0:
            return 0.0
        now = time.perf_counter() if now is None else now
        completions, elapsed = replica.completions, replica.elapsed
        while completions and completions[0] < now - self.window_s:
            completions.popleft()
        while len(elapsed) > len(completions):
            elapsed.popleft()
        if len(completions) < self.min_completions:
            return None
        wait_s = replica.in_flight / (len(completions) / self.window_s)
        if elapsed:
            wait_s = min(wait_s, replica.in_flight * sum(elapsed) / len(elapsed))
        return wait_s

    def expected_start_s(self, replicas: list[str], needed: int, now: float | None = None) -> float:
        """The wait until `needed` of `replicas` can have answered: the needed-th smallest estimate
        (a replica that gives no estimate counts as ready at once)."""
        waits = sorted(w if (w := self.expected_wait_s(n, now)) is not None else 0.0 for n in replicas)
        return waits[needed - 1] if waits else 0.0


class LoopLag:
    """How far behind the event loop is: the overshoot of a short periodic sleep, averaged over the
    ticks of the last `window_s` (one burst or one slow callback does not count as overload, a
    loop that stays behind does), and at least the time since the last tick was due (a loop that
    has fallen far behind runs few ticks, and must not wait for them to notice)."""

    def __init__(
        self, interval_s: float = 0.005, window_s: float = 0.1, observe: Callable[[float], None] | None = None
    ) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self.ticks: deque[tuple[float, float]] = deque()  # (when, lag)
        self.last = time.perf_counter()
        self.observe = observe
        self._task: asyncio.Task[None] | None = None

    @property
    def lag_s(self) -> float:
        now = time.perf_counter()
        overdue = now - self.last - self.interval_s
        ticks = self.ticks
        while ticks and ticks[0][0] < now - self.window_s:
            ticks.popleft()
        recent = sum(lag for _, lag in ticks) / len(ticks) if ticks else 0.0
        return max(recent, overdue, 0.0)

    async def _run(self) -> None:
        while True:
            self.last = before = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            now = time.perf_counter()
            lag = max(0.0, now - before - self.interval_s)
            self.ticks.append((now, lag))
            if self.observe is not None:
                self.observe(lag)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


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
        kept_calls, kept_cuts = self.calls.get(replica, deque()), self.cuts.get(replica, deque())
        seconds = [s for t, s in kept_calls if t >= since]
        cut = [s for t, s in kept_cuts if t >= since]
        calls, calls_exact = _count(len(seconds), kept_calls, now)
        cuts, cuts_exact = _count(len(cut), kept_cuts, now)
        out: dict[str, Any] = {
            "calls": calls,
            "calls_exact": calls_exact,
            "errors": sum(t >= since for t in self.errors.get(replica, ())),
            "cut": cuts,
            "cut_exact": cuts_exact,
            "cut_max_ms": round(max(cut) * 1000, 2) if cut else None,
            "p50_ms": None,
            "p99_ms": None,
        }
        if seconds:
            p50, p99 = np.percentile(seconds, [50, 99]) * 1000
            out["p50_ms"], out["p99_ms"] = round(p50, 2), round(p99, 2)
        return out


def _count(in_window: int, kept: deque[tuple[float, float]], now: float) -> tuple[int, bool]:
    """How many of a replica's calls ended in the last WINDOW_S, and whether that is exact: when the
    last KEPT calls all ended within it, more did, and the count is estimated from their rate."""
    if len(kept) < KEPT or kept[0][0] < now - WINDOW_S:
        return in_window, True
    return round(in_window * WINDOW_S / max(now - kept[0][0], 1e-3)), False
