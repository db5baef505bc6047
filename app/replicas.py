"""The replicas as the gateway reaches them: every worker process (pod) of every member and coded
model over its own channel (app/channel.py), their health, their identity, and which one a call
goes to.

**Endpoints.** A replica's address is `tcp://HOST:PORT` (the worker's channel port). HOST is
resolved, and re-resolved every health interval, to every address it names: on Kubernetes a
headless Service per member names every pod, so the gateway holds one channel per pod, and pods
added by a scale-up take calls as soon as their channel is up (kube-proxy would spread connections,
not calls). A call goes to the usable endpoint with the fewest calls in flight on its channel
(its own queue length, known to the gateway without asking). An endpoint whose address is no
longer resolved takes no new calls and is closed once its calls in flight have ended.

**Health.** An endpoint is usable once its channel is up and the worker's `Welcome` carried the
gateway's identity. A connection that fails or is lost is re-dialled after 0.1 s, doubling up to
`health_backoff_max_s` (with jitter): while no endpoint of a replica is connected its circuit is
open, requests skip it (its answer is decoded, or the request fails at once if it cannot be). Every
channel is pinged each `health_interval_s`; a worker that misses `health_failure_threshold` pings
in a row (a SIGSTOPped process keeps its connection open) counts as not ready, but calls still go
to it: the patience, the deadline and the coded replica deal with a slow replica. A worker that
drains (SIGTERM) says so in its pongs and takes no new calls while another endpoint can.

**Identity** (DESIGN §3). The `Welcome` carries the sha256 of the bundle manifest the worker
loaded, the model(s) it serves and its refinement planes. A worker whose identity differs from the
gateway's (a half-done rolling update: another bundle's member would be decoded with this bundle's
coefficients) is not used: its channel is closed and re-dialled with back-off, each refusal is
counted, and a change is logged once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from app.channel import Backoff, ChannelConfig, IdentityError, NotWelcomedError, WorkerChannel, dial
from app.group import Group, parse_address
from app.metrics import GatewayMetrics
from app.settings import GatewaySettings
from protocol.channel import MAX_FRAME_BYTES, Welcome

logger = logging.getLogger(__name__)
HEDGE = "hedge"  # the name of the hedging replica (`Group.hedge_url`)
Address = tuple[str, int]
Resolver = Callable[[str, int], Awaitable[list[Address]]]


def identity_mismatch(group: Group, name: str, reported: object) -> str | None:
    """Why the identity a replica reported is not the one the gateway needs at that address; None if
    it is. Same bundle (the manifest's sha256, when the group knows it), the model it is called for
    (the hedging replica: every member; serving more is fine, calls name their model) and the same
    planes."""
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


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve(host: str, port: int) -> list[Address]:
    """Every address HOST names (IPv4 ones when there are any), sorted; a literal IP is itself."""
    if _is_literal(host):
        return [(host, port)]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = sorted({(str(info[4][0]), port) for info in infos})
    v4 = [a for a in addresses if ":" not in a[0]]
    return v4 or addresses


class Endpoint:
    """One worker process of a replica: its channel, dialled again with back-off when it fails."""

    def __init__(self, replica: Replica, address: Address) -> None:
        self.replica = replica
        self.address = address
        self.channel: WorkerChannel | None = None
        self.reason = "not connected yet"
        self.mismatch: str | None = None
        self.retiring = False  # no longer resolved: no new calls, closed once idle
        self.stopped = False
        self.backoff = Backoff(0.1, replica.owner.settings.health_backoff_max_s)
        self.dialling: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.up_since = 0.0

    @property
    def usable(self) -> bool:
        return self.channel is not None and self.channel.usable and not self.retiring

    def start(self) -> None:
        self.dialling = asyncio.get_running_loop().create_task(self._dial(), name=f"dial-{self.replica.name}")

    async def _dial(self) -> None:
        owner = self.replica.owner
        try:
            channel = await dial(self.replica.name, self.address, owner.config_for(self.replica.name))
        except IdentityError as exc:
            self._down(str(exc), mismatch=str(exc))
        except NotWelcomedError as exc:
            self._down(str(exc))
        except (OSError, TimeoutError) as exc:
            self._down(f"cannot connect: {type(exc).__name__}: {exc}".rstrip(": "))
        else:
            if self.stopped or self.retiring:
                channel.close("endpoint stopped", quiet=True)
                return
            self.channel = channel
            channel.on_lost = self._lost
            channel.on_health = lambda _channel: self.replica.changed()
            channel.on_resolutions = lambda ch: owner.on_resolutions(self.replica.name, ch.resolutions)
            self.mismatch, self.reason, self.up_since = None, "", time.monotonic()
            if channel.welcome is not None:
                owner.on_welcome(self.replica.name, channel.welcome)
            self.replica.changed()
            self._schedule(self._ping, owner.settings.health_interval_s)
        finally:
            self.dialling = None

    def _down(self, reason: str, mismatch: str | None = None) -> None:
        self.reason = reason
        if mismatch is not None:
            self.replica.owner.metrics.replica_identity_mismatch.labels(self.replica.name).inc()
            if self.mismatch != mismatch:
                logger.warning("replica %s (%s) is not used: %s", self.replica.name, _where(self.address), mismatch)
        self.mismatch = mismatch
        self.replica.changed()
        if not self.stopped and not self.retiring:
            delay = self.backoff.delay_s() * self.replica.owner.rng.uniform(0.8, 1.2)
            self._schedule(self.start, delay)

    def _lost(self, channel: WorkerChannel) -> None:
        if channel is not self.channel:
            return
        self.channel = None
        if self.retiring or self.stopped:
            self.replica.drop(self)
            return
        if time.monotonic() - self.up_since > 5.0:
            self.backoff.reset()  # it had been up a while: a restart, not a crash loop
        self._down(channel.why_closed)

    def _ping(self) -> None:
        channel = self.channel
        if channel is None or self.stopped:
            return
        if self.retiring and channel.in_flight == 0:
            channel.close("its address is no longer resolved", quiet=True)
            return
        channel.ping()
        settings = self.replica.owner.settings
        self._schedule(self._ping, settings.health_interval_s * self.replica.owner.rng.uniform(0.8, 1.2))

    def _schedule(self, callback: Callable[[], None], delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(delay, callback)

    def retire(self) -> None:
        self.retiring = True
        if self.channel is None:
            self.stop()
            self.replica.drop(self)

    def stop(self) -> None:
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
        if self.dialling is not None:
            self.dialling.cancel()
        if self.channel is not None:
            self.channel.on_lost = lambda _channel: None
            self.channel.close("the gateway shut down", quiet=True)

    def status(self) -> dict[str, object]:
        channel = self.channel
        return {
            "address": _where(self.address),
            "connected": self.usable,
            "in_flight": channel.in_flight if channel is not None else 0,
            "reason": None if self.usable else self.reason,
        }


def _where(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Replica:
    """One member, coded model or the hedging replica: every endpoint its address resolves to."""

    def __init__(self, owner: Replicas, name: str, address: Address) -> None:
        self.owner = owner
        self.name = name
        self.host, self.port = address
        self.endpoints: dict[Address, Endpoint] = {}
        self.ready = False
        self.started = False  # seen ready at least once
        self._rr = 0

    def pick(self) -> WorkerChannel | None:
        """The usable channel with the fewest calls in flight (ready workers before draining ones)."""
        if len(self.endpoints) == 1:  # one worker process: the common case, and the hot path
            (endpoint,) = self.endpoints.values()
            return endpoint.channel if endpoint.usable else None
        best: WorkerChannel | None = None
        best_key: tuple[int, int] | None = None
        endpoints = list(self.endpoints.values())
        if len(endpoints) > 1:  # rotate the start so that ties spread
            self._rr = (self._rr + 1) % len(endpoints)
            endpoints = endpoints[self._rr :] + endpoints[: self._rr]
        for endpoint in endpoints:
            channel = endpoint.channel
            if channel is None or not endpoint.usable:
                continue
            key = (0 if channel.ready else 1, channel.in_flight)
            if best_key is None or key < best_key:
                best, best_key = channel, key
        return best

    @property
    def connected(self) -> bool:
        return any(e.usable for e in self.endpoints.values())

    @property
    def mismatch(self) -> str | None:
        """The identity mismatch, when every endpoint that answered has one."""
        reasons = [e.mismatch for e in self.endpoints.values()]
        return reasons[0] if reasons and all(reasons) else None

    @property
    def stalled(self) -> bool:
        """Connected, and every connected worker has missed `health_failure_threshold` pings in a row."""
        threshold = self.owner.settings.health_failure_threshold
        channels = [e.channel for e in self.endpoints.values() if e.usable and e.channel is not None]
        return bool(channels) and all(c.missed >= threshold for c in channels)

    def _healthy(self) -> bool:
        threshold = self.owner.settings.health_failure_threshold
        return any(
            e.usable and e.channel is not None and e.channel.ready and e.channel.missed < threshold
            for e in self.endpoints.values()
        )

    def reason(self) -> str:
        endpoints = list(self.endpoints.values())
        if not endpoints:
            return f"{self.host} resolves to no address"
        for e in endpoints:
            if e.mismatch:
                return e.mismatch
        for e in endpoints:
            channel = e.channel
            if channel is not None and channel.usable:
                if not channel.ready:
                    return "draining: shutting down"
                if channel.missed:
                    return f"missed {channel.missed} health checks in a row (no answer to a ping)"
        return endpoints[0].reason or "not connected"

    def changed(self) -> None:
        """Re-derive readiness after any endpoint event; log and count a change once."""
        ready = self._healthy()
        if ready != self.ready:
            if ready:
                logger.info("replica %s is ready", self.name)
            else:
                logger.warning("replica %s is NOT ready: %s", self.name, self.reason())
        self.ready = ready
        self.started |= ready
        metrics = self.owner.metrics
        metrics.replica_ready.labels(self.name).set(1 if ready else 0)
        metrics.replica_circuit_open.labels(self.name).set(0 if self.connected or self.mismatch else 1)
        self.owner.changed()

    async def refresh(self, resolver: Resolver) -> None:
        """Resolve the address again: new endpoints are dialled, vanished ones retired."""
        try:
            addresses = await resolver(self.host, self.port)
        except OSError as exc:
            logger.warning("replica %s: cannot resolve %s: %s", self.name, self.host, exc)
            return
        for address in addresses:
            if address not in self.endpoints:
                endpoint = self.endpoints[address] = Endpoint(self, address)
                endpoint.start()
        for address, endpoint in list(self.endpoints.items()):
            if address not in addresses and not endpoint.retiring:
                endpoint.retire()
        self.changed()

    def drop(self, endpoint: Endpoint) -> None:
        if self.endpoints.get(endpoint.address) is endpoint:
            del self.endpoints[endpoint.address]
        self.changed()


class Replicas:
    def __init__(
        self,
        group: Group,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        drain: threading.Event,
        resolver: Resolver = resolve,
    ) -> None:
        self.group = group
        self.settings = settings
        self.metrics = metrics
        self.drain = drain  # set on SIGTERM: readiness fails while in-flight work finishes
        self.resolver = resolver
        self.rng = random.Random(0)
        addresses = {**group.urls, **({HEDGE: group.hedge_url} if group.hedge_url else {})}
        self.replicas = {name: Replica(self, name, parse_address(url)) for name, url in addresses.items()}
        secret = settings.worker_secret
        self._secret = secret.get_secret_value() if secret is not None else ""
        self._task: asyncio.Task[None] | None = None
        self._skipped = set(self.group.urls)  # until connected (kept up to date by `changed`)
        # Connected, but every connected worker has missed its pings (a paused process).
        self.unresponsive: set[str] = set()
        # Told each accepted `Welcome` (its warm-up measurements seed the fan-out's patience).
        self.on_welcome: Callable[[str, Welcome], None] = lambda name, welcome: None
        # Told each report of a worker's live resolutions (in its Welcome, then in Pongs when it changes).
        self.on_resolutions: Callable[[str, dict[str, Any]], None] = lambda name, reports: None

    def changed(self) -> None:
        """A replica's state changed: what every request reads is computed here, not per request."""
        self._skipped = {n for n, r in self.replicas.items() if n in self.group.urls and not r.connected}
        self.unresponsive = {n for n, r in self.replicas.items() if r.stalled}

    def config_for(self, name: str) -> ChannelConfig:
        def check(welcome: Welcome) -> str | None:
            return identity_mismatch(self.group, name, welcome.identity)

        return ChannelConfig(
            self._secret,
            f"gateway pid {os.getpid()}",
            self.group.classes,
            self.group.resolutions,
            check,
            self.settings.connect_timeout_s,
            self.settings.health_timeout_s,
            MAX_FRAME_BYTES,
        )

    # what requests and status read ---------------------------------------------------------------
    def pick(self, name: str) -> WorkerChannel | None:
        return self.replicas[name].pick()

    @property
    def ready(self) -> dict[str, bool]:
        return {name: r.ready for name, r in self.replicas.items()}

    @property
    def unreachable(self) -> set[str]:
        """Open circuits: no endpoint connected (and not for a mismatched identity)."""
        return {n for n, r in self.replicas.items() if not r.connected and not r.mismatch}

    @property
    def mismatched(self) -> dict[str, str]:
        return {n: m for n, r in self.replicas.items() if (m := r.mismatch) is not None and not r.connected}

    @property
    def draining(self) -> bool:
        return self.drain.is_set()

    @property
    def skipped(self) -> set[str]:
        """Group replicas no request may call: none of their endpoints is connected."""
        return self._skipped

    @property
    def is_hedge_usable(self) -> bool:
        hedge = self.replicas.get(HEDGE)
        return hedge is not None and hedge.connected

    @property
    def started(self) -> set[str]:
        return {n for n, r in self.replicas.items() if r.started}

    def reasons(self) -> dict[str, str]:
        """Why each replica that is not ready is out."""
        return {name: r.reason() for name, r in self.replicas.items() if not r.ready}

    def is_ready(self) -> bool:
        if self.draining:
            return False
        down_members = sum(not self.replicas[m].ready for m in self.group.members)
        up_coded = sum(self.replicas[c].ready for c in self.group.coded)
        return down_members <= up_coded

    def resolutions(self, name: str) -> dict[str, Any] | None:
        """What the replica's first connected worker measured: its live resolutions, cost ratios and
        why (workers/costs.py `report`); every model's, keyed by name, for the hedging replica."""
        for endpoint in self.replicas[name].endpoints.values():
            channel = endpoint.channel
            if channel is not None and endpoint.usable and channel.resolutions:
                return channel.resolutions.get(name) if name in channel.resolutions else channel.resolutions
        return None

    def endpoints(self, name: str) -> list[dict[str, object]]:
        return [e.status() for e in self.replicas[name].endpoints.values()]

    # running -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resolve and dial every replica, wait (at most the connect time-out) for the first
        outcomes, then keep re-resolving in the background."""
        await asyncio.gather(*(r.refresh(self.resolver) for r in self.replicas.values()))
        deadline = time.monotonic() + self.settings.connect_timeout_s
        while time.monotonic() < deadline and any(
            e.dialling is not None for r in self.replicas.values() for e in r.endpoints.values()
        ):
            await asyncio.sleep(0.01)
        self._task = asyncio.create_task(self._refresh_forever(), name="replica-addresses")

    async def _refresh_forever(self) -> None:
        names = [r for r in self.replicas.values() if not _is_literal(r.host)]
        while names:
            await asyncio.sleep(self.settings.health_interval_s)
            await asyncio.gather(*(r.refresh(self.resolver) for r in names))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for replica in self.replicas.values():
            for endpoint in replica.endpoints.values():
                endpoint.stop()
