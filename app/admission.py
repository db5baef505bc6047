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

import time
from collections.abc import Callable

from app.errors import TooManyRequestsError, UnavailableError
from app.group import Group
from app.measures import LoopLag, ReplicaLoad
from app.metrics import GatewayMetrics
from app.settings import GatewaySettings


class Admission:
    """The gateway's limits and its overload guard; counts what is in flight."""

    def __init__(
        self,
        settings: GatewaySettings,
        group: Group,
        metrics: GatewayMetrics,
        lag: LoopLag,
        load: ReplicaLoad,
        skipped: Callable[[], set[str]],
    ) -> None:
        self.settings, self.group, self.metrics = settings, group, metrics
        self.lag, self.load, self.skipped = lag, load, skipped
        self.inflight = 0
        self.open_streams = 0
        self._refused = {r: metrics.refused.labels(r) for r in ("limit", "streams", "overloaded", "deadline")}

    def request(self) -> Slot:
        if self.inflight >= self.settings.max_concurrent_requests:
            self._refused["limit"].inc()
            raise TooManyRequestsError("too many requests in flight; retry shortly", headers={"Retry-After": "1"})
        return Slot(self, stream=False)

    def stream(self) -> Slot:
        if self.open_streams >= self.settings.max_open_streams:
            self._refused["streams"].inc()
            raise TooManyRequestsError("too many open event streams; retry shortly", headers={"Retry-After": "1"})
        return Slot(self, stream=True)

    def check_deadline(self, deadline_ms: float | None, members: list[str] | None, arrival: float) -> None:
        """Refuse (503 + Retry-After) a request with a deadline while the gateway's loop is behind, or
        that its replicas cannot start before its deadline. A request without one is only bounded by
        the limits: it may wait, it has nothing to miss."""
        if deadline_ms is None:
            return
        settings = self.settings
        lag_s = self.lag.lag_s
        behind = lag_s * 1000 > max(settings.overload_lag_ms, settings.overload_lag_fraction * deadline_ms)
        if behind and self.inflight >= settings.overload_min_inflight:
            self._refused["overloaded"].inc()
            raise UnavailableError(
                f"overloaded: the gateway is {lag_s * 1000:.0f} ms behind; retry shortly", headers={"Retry-After": "1"}
            )
        now = time.perf_counter()
        left_s = deadline_ms / 1000 - (now - arrival)
        group = self.group
        if members is None or members == group.members:
            skipped = self.skipped()
            replicas = [n for n in [*group.members, *group.coded] if n not in skipped]
            needed = len(group.members)
        else:
            replicas, needed = list(members), len(members)
        if needed > len(replicas):
            return  # not answerable at all: the request fails fast on its own, with the reason
        wait_s = self.load.expected_start_s(replicas, needed, now)
        if wait_s >= left_s:
            self._refused["deadline"].inc()
            retry = max(1, round(wait_s))
            raise UnavailableError(
                f"overloaded: the replicas would start this request in about {wait_s * 1000:.0f} ms, after its "
                f"deadline ({max(left_s, 0) * 1000:.0f} ms left); retry shortly",
                headers={"Retry-After": str(retry)},
            )


class Slot:
    """A place within one of the gateway's limits, given back exactly once."""

    def __init__(self, admission: Admission, stream: bool) -> None:
        self.admission, self.stream, self.held = admission, stream, True
        if stream:
            admission.open_streams += 1
            admission.metrics.streams.inc()
        else:
            admission.inflight += 1
            admission.metrics.inflight.inc()

    def release(self) -> None:
        if self.held:
            self.held = False
            admission = self.admission
            if self.stream:
                admission.open_streams -= 1
                admission.metrics.streams.dec()
            else:
                admission.inflight -= 1
                admission.metrics.inflight.dec()
