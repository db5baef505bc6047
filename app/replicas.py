"""Replica readiness, re-checked in the background with per-replica exponential backoff, and the
circuit breaker that keeps requests away from replicas that refuse connections.

A replica that fails its check is tried again after 2×, 4×, … the interval (capped), with jitter so
that replicas that went down together are not all re-checked at the same instant; a replica that
passes is back at the normal interval. A replica that has never been ready (still starting) is
checked at the normal interval, so the gateway sees it soon after it loads its model.

A ready replica goes out at once when it says it is not ready or refuses the connection, but only
after `health_failure_threshold` missed checks in a row when a check merely times out (a replica
busy with a burst, or on a starved CPU, answers the next one; a SIGSTOPped one misses them all).
The gateway is ready when enough replicas are: every member, or all but as many members as there
are ready coded replicas to decode them.

A call that cannot even connect (refused, unreachable) opens the replica's circuit: requests stop
calling it (its answer is decoded, or the request fails at once if it cannot be) and its health
check runs at once, then with backoff; the first passing check closes the circuit. A replica that
is merely slow (a SIGSTOPped process still accepts connections) is never skipped: the deadline and
the coded replica deal with it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading

from app.group import Group
from app.metrics import GatewayMetrics
from app.upstream import Probe, ReplicaClient

logger = logging.getLogger(__name__)


class ReplicaHealth:
    def __init__(self, group: Group, client: ReplicaClient, metrics: GatewayMetrics, drain: threading.Event) -> None:
        self.group = group
        self.client = client
        self.metrics = metrics
        self.ready: dict[str, bool] = {name: False for name in group.urls}
        self.unreachable: set[str] = set()  # open circuits: calls skip these replicas
        self.missed: dict[str, int] = {name: 0 for name in group.urls}  # missed checks in a row
        self.started: set[str] = set()  # replicas seen ready at least once
        self._wake: dict[str, asyncio.Event] = {name: asyncio.Event() for name in group.urls}
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random(0)
        self.drain = drain  # set on SIGTERM: readiness fails while in-flight work finishes

    @property
    def draining(self) -> bool:
        return self.drain.is_set()

    def is_ready(self) -> bool:
        if self.draining:
            return False
        down_members = sum(not self.ready[m] for m in self.group.members)
        up_coded = sum(self.ready[c] for c in self.group.coded)
        return down_members <= up_coded

    def mark_unreachable(self, name: str) -> None:
        """A call could not connect: skip the replica until a health check passes again."""
        if name in self.unreachable or name not in self.ready:
            return
        logger.warning("replica %s refused a connection: skipped until a health check passes", name)
        self.unreachable.add(name)
        self.metrics.replica_circuit_open.labels(name).set(1)
        self._set(name, False)
        self._wake[name].set()

    async def check_all(self) -> None:
        results = await asyncio.gather(*(self._check(name) for name in self.ready))
        for name, probe in zip(self.ready, results, strict=True):
            self._record(name, probe)

    async def _check(self, name: str) -> Probe:
        return await self.client.ready(self.group.urls[name], timeout_s=self.client.settings.health_timeout_s)

    def _record(self, name: str, probe: Probe) -> bool:
        """Apply one check's outcome; returns whether the replica is now counted ready."""
        if probe == "missed" and self.ready[name]:
            self.missed[name] += 1
            if self.missed[name] < self.client.settings.health_failure_threshold:
                logger.info("replica %s missed a health check (%d in a row)", name, self.missed[name])
                return True
        self.missed[name] = 0
        self._set(name, probe == "ready")
        return self.ready[name]

    def _set(self, name: str, ok: bool) -> None:
        if ok != self.ready[name]:
            if ok:
                logger.info("replica %s is ready", name)
            else:
                logger.warning("replica %s is NOT ready", name)
        self.ready[name] = ok
        if ok:
            self.started.add(name)
        self.metrics.replica_ready.labels(name).set(1 if ok else 0)
        if ok and name in self.unreachable:
            self.unreachable.discard(name)
            self.metrics.replica_circuit_open.labels(name).set(0)
            logger.info("replica %s answers its health check again: calls resume", name)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch_all(), name="replica-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch_all(self) -> None:
        await asyncio.gather(*(self._watch(name) for name in self.ready))

    async def _watch(self, name: str) -> None:
        interval = self.client.settings.health_interval_s
        wait = interval
        wake = self._wake[name]
        while True:
            wake.clear()
            ok = self._record(name, await self._check(name))
            if ok or name not in self.started:
                wait = interval
            else:
                wait = min(wait * 2, self.client.settings.health_backoff_max_s)
            try:  # sleep with jitter, or until a failed call asks for a check now
                await asyncio.wait_for(wake.wait(), wait * self._rng.uniform(0.8, 1.2))
            except TimeoutError:
                pass
