"""Admission: the gateway accepts only what it can finish.

Two bounds, both answered at once (never by queueing):
- **Limits** (429 + `Retry-After`): at most `max_concurrent_requests` requests in flight and
  `max_open_streams` open event streams. A slot is taken with no await between the check and the
  count (a burst cannot slip past while bodies are read) and given back exactly once: a request's
  slot when its terminal event is written (also for a detached `/v1` request), a stream's when
  the connection ends.
- **Deadlines under overload** (503 + `Retry-After`): a request with `deadline_ms` whose replicas
  cannot start it in time is refused. Per replica the gateway knows its calls in flight (L) and
  how many calls it completed in the last `window_s` (throughput X); by Little's law a new call
  waits about L / X. The request needs every member answered or decoded, so with r coded
  replicas it needs the fastest k of its k + r replicas: if the k-th smallest wait already exceeds
  what is left of the deadline, the request would only occupy replicas until its deadline and
  then fail, pushing everyone behind it later. 503, not 429: the client did nothing wrong; the
  service is overloaded for the moment and says when to retry.
  A replica with calls in flight but no completion in the window (a paused straggler) gives no
  estimate and does not refuse anything: the deadline and the coded replica deal with it.
- **The gateway's own lag** (503 + `Retry-After`, for requests with a deadline): a timer that
  should fire every 5 ms measures how late the event loop runs it (averaged over 100 ms, or overdue
  now). When the loop is more than `overload_lag_ms` behind (or `overload_lag_fraction` of the
  request's deadline, if that is more), the gateway itself is the bottleneck:
  every request it takes on makes every other one later, their deadlines and their refusals
  included, so new deadline requests are turned away at once (a one-image body costs about 50 µs
  to parse). Only while `overload_min_inflight` requests are in flight: a loop behind with fewer
  is slowed by something else (another process on its cores) and refusing cures nothing. Requests
  without a deadline are bounded by the limits only: they have nothing to miss.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.errors import TooManyRequestsError, UnavailableError

if TYPE_CHECKING:
    from app.state import Gateway


@dataclass
class _Replica:
    in_flight: int = 0
    completions: deque[float] = field(default_factory=deque)  # perf_counter of each completed call


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

    def finished(self, name: str, completed: bool, now: float | None = None) -> None:
        replica = self._of(name)
        replica.in_flight -= 1
        if completed:
            replica.completions.append(time.perf_counter() if now is None else now)

    def expected_wait_s(self, name: str, now: float | None = None) -> float | None:
        """L / X for a new call on `name`, or None without enough recent completions to tell."""
        replica = self.replicas.get(name)
        if replica is None or replica.in_flight == 0:
            return 0.0
        now = time.perf_counter() if now is None else now
        completions = replica.completions
        while completions and completions[0] < now - self.window_s:
            completions.popleft()
        if len(completions) < self.min_completions:
            return None
        return replica.in_flight / (len(completions) / self.window_s)

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


class Slot:
    """A place within one of the gateway's limits, given back exactly once."""

    def __init__(self, gw: Gateway, stream: bool) -> None:
        self.gw, self.stream, self.held = gw, stream, True
        if stream:
            gw.open_streams += 1
            gw.metrics.streams.inc()
        else:
            gw.inflight += 1
            gw.metrics.inflight.inc()

    def release(self) -> None:
        if self.held:
            self.held = False
            if self.stream:
                self.gw.open_streams -= 1
                self.gw.metrics.streams.dec()
            else:
                self.gw.inflight -= 1
                self.gw.metrics.inflight.dec()


def admit_request(gw: Gateway) -> Slot:
    if gw.inflight >= gw.settings.max_concurrent_requests:
        gw.metrics.refused.labels("limit").inc()
        raise TooManyRequestsError("too many requests in flight; retry shortly", headers={"Retry-After": "1"})
    return Slot(gw, stream=False)


def admit_stream(gw: Gateway) -> Slot:
    if gw.open_streams >= gw.settings.max_open_streams:
        gw.metrics.refused.labels("streams").inc()
        raise TooManyRequestsError("too many open event streams; retry shortly", headers={"Retry-After": "1"})
    return Slot(gw, stream=True)


def check_deadline(gw: Gateway, deadline_ms: float | None, members: list[str] | None, arrival: float) -> None:
    """Refuse (503 + Retry-After) a request with a deadline while the gateway's loop is behind, or
    that its replicas cannot start before its deadline. A request without one is only bounded by
    the limits: it may wait, it has nothing to miss."""
    if deadline_ms is None:
        return
    lag_s = gw.lag.lag_s
    behind = lag_s * 1000 > max(gw.settings.overload_lag_ms, gw.settings.overload_lag_fraction * deadline_ms)
    if behind and gw.inflight >= gw.settings.overload_min_inflight:
        gw.metrics.refused.labels("overloaded").inc()
        raise UnavailableError(
            f"overloaded: the gateway is {lag_s * 1000:.0f} ms behind; retry shortly", headers={"Retry-After": "1"}
        )
    now = time.perf_counter()
    left_s = deadline_ms / 1000 - (now - arrival)
    group = gw.group
    if members is None or members == group.members:
        replicas = [n for n in [*group.members, *group.coded] if n not in gw.fanout.skipped()]
        needed = len(group.members)
    else:
        replicas, needed = list(members), len(members)
    if needed > len(replicas):
        return  # not answerable at all: the request fails fast on its own, with the reason
    wait_s = gw.fanout.load.expected_start_s(replicas, needed, now)
    if wait_s >= left_s:
        gw.metrics.refused.labels("deadline").inc()
        retry = max(1, round(wait_s))
        raise UnavailableError(
            f"overloaded: the replicas would start this request in about {wait_s * 1000:.0f} ms, after its "
            f"deadline ({max(left_s, 0) * 1000:.0f} ms left); retry shortly",
            headers={"Retry-After": str(retry)},
        )
