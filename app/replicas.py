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

Every ready answer carries the replica's identity (DESIGN §3): the sha256 of the bundle manifest's
bytes, the model(s) it serves and its refinement planes. A replica whose identity differs from the
gateway's (a half-done rolling update: another bundle's member would be decoded with this bundle's
coefficients) counts as down and is skipped by every request, like an open circuit, until a check
finds the gateway's identity again; each such check is counted, and a change is logged once. A
replica that reports no identity at all (a build from before identities) is accepted, with one
warning: refusing it would take the whole service down during the rolling update that brings
identities in, and it is no worse than what the gateway trusted before.
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
HEDGE = "hedge"  # the health checks' name for the hedging replica (`Group.hedge_url`)


def identity_mismatch(group: Group, name: str, reported: object) -> str | None:
    """Why the identity a replica reported is not the one the gateway needs at that URL; None if it is.

    Same bundle (the manifest's sha256, when the group knows it), the model it is called for (the
    hedging replica: every member; serving more is fine, calls name their model) and the same planes.
    """
    if not isinstance(reported, dict):
        return f"identity mismatch: not an identity object: {str(reported)[:80]}"
    problems = []
    sha = reported.get("bundle_sha256")
    if group.manifest_sha256 is not None and sha != group.manifest_sha256:
        problems.append(f"bundle sha256 {_short(sha)} != {_short(group.manifest_sha256)} (the gateway's)")
    model = reported.get("model")
    served = [model] if isinstance(model, str) else model if isinstance(model, list) else []
    needed = group.members if name == HEDGE else [name]
    if any(m not in served for m in needed):
        problems.append(f"serves {model!r}, not {needed[0] if len(needed) == 1 else needed!r}")
    planes = group.planes[:-1]  # the last resolution is float32 in every plan
    if reported.get("refinement") != planes:
        problems.append(f"refinement planes {reported.get('refinement')!r} != {planes} (the gateway's)")
    return "identity mismatch: " + "; ".join(problems) if problems else None


def _short(sha: object) -> str:
    return f"{sha[:12]}…" if isinstance(sha, str) else repr(sha)


class ReplicaHealth:
    def __init__(self, group: Group, client: ReplicaClient, metrics: GatewayMetrics, drain: threading.Event) -> None:
        self.group = group
        self.client = client
        self.metrics = metrics
        self.urls = {**group.urls, **({HEDGE: group.hedge_url} if group.hedge_url else {})}
        self.ready: dict[str, bool] = {name: False for name in self.urls}
        self.unreachable: set[str] = set()  # open circuits: calls skip these replicas
        self.mismatched: dict[str, str] = {}  # replica → how its identity differs: calls skip these too
        self.missed: dict[str, int] = {name: 0 for name in self.urls}  # missed checks in a row
        self.started: set[str] = set()  # replicas seen ready at least once
        self._failures: dict[str, str] = {}  # replica → why its last check failed (cleared when it passes)
        self._unverified: set[str] = set()  # ready replicas that report no identity (warned once)
        self._wake: dict[str, asyncio.Event] = {name: asyncio.Event() for name in self.urls}
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random(0)
        self.drain = drain  # set on SIGTERM: readiness fails while in-flight work finishes

    @property
    def draining(self) -> bool:
        return self.drain.is_set()

    @property
    def skipped(self) -> set[str]:
        """Group replicas no request may call: open circuits and identity mismatches."""
        return {name for name in self.unreachable.union(self.mismatched) if name in self.group.urls}

    @property
    def is_hedge_usable(self) -> bool:
        """False while the hedging replica reports another identity (it must serve every member)."""
        return HEDGE not in self.mismatched

    def reasons(self) -> dict[str, str]:
        """Why each replica that is not ready is out: its identity mismatch, else its last failed check."""
        return {
            name: self.mismatched.get(name) or self._failures.get(name, "not checked yet")
            for name, ok in self.ready.items()
            if not ok
        }

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
        self._failures[name] = "a request could not connect: waiting for a health check"
        self._set(name, False)
        self._wake[name].set()

    async def check_all(self) -> None:
        results = await asyncio.gather(*(self._check(name) for name in self.ready))
        for name, probe in zip(self.ready, results, strict=True):
            self._record(name, probe)

    async def _check(self, name: str) -> Probe:
        return await self.client.ready(self.urls[name], timeout_s=self.client.settings.health_timeout_s)

    def _record(self, name: str, probe: Probe) -> bool:
        """Apply one check's outcome; returns whether the replica is now counted ready."""
        if probe.outcome == "ready":
            probe = self._verify(name, probe)
        detail = probe.detail
        if probe.outcome == "missed" and self.ready[name]:
            self.missed[name] += 1
            if self.missed[name] < self.client.settings.health_failure_threshold:
                logger.info("replica %s missed a health check (%d in a row)", name, self.missed[name])
                return True
            detail = f"missed {self.missed[name]} health checks in a row (last: {detail})"
        self.missed[name] = 0
        if probe.outcome != "ready":
            self._failures[name] = detail
        self._set(name, probe.outcome == "ready")
        return self.ready[name]

    def _verify(self, name: str, probe: Probe) -> Probe:
        """A ready answer whose identity differs from the gateway's counts as down."""
        if probe.identity is None:
            reason = None
            if name not in self._unverified:
                logger.warning("replica %s reports no identity (an older build): used unverified", name)
                self._unverified.add(name)
        else:
            self._unverified.discard(name)
            reason = identity_mismatch(self.group, name, probe.identity)
        if reason is None:
            if self.mismatched.pop(name, None) is not None:
                logger.info("replica %s reports the gateway's identity again: calls resume", name)
            return probe
        self.metrics.replica_identity_mismatch.labels(name).inc()
        if self.mismatched.get(name) != reason:
            logger.warning("replica %s is not used: %s", name, reason)
            self.mismatched[name] = reason
        return Probe("down", probe.identity, reason)

    def _set(self, name: str, ok: bool) -> None:
        if ok != self.ready[name]:
            if ok:
                logger.info("replica %s is ready", name)
            else:
                logger.warning("replica %s is NOT ready", name)
        self.ready[name] = ok
        if ok:
            self.started.add(name)
            self._failures.pop(name, None)
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
