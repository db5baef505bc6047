"""The gateway's shared state, created in the lifespan and handed to every handler: the top of the
request path, which imports the layers below it and is imported by none of them."""

from __future__ import annotations

from dataclasses import dataclass

from app.admission import Admission
from app.dataplane import DataPlane
from app.eventlog import LogStore
from app.fanout import Fanout
from app.group import Group
from app.lifecycle import Lifecycle
from app.measures import LoopLag
from app.metrics import GatewayMetrics
from app.replicas import Replicas
from app.settings import GatewaySettings


@dataclass
class Gateway:
    settings: GatewaySettings
    group: Group
    replicas: Replicas
    fanout: Fanout
    store: LogStore
    metrics: GatewayMetrics
    lag: LoopLag
    admission: Admission
    lifecycle: Lifecycle
    dataplane: DataPlane
    examples: bytes = b'{"examples": []}'  # the /v1/examples body (app/examples.py), encoded once

    @property
    def health(self) -> Replicas:
        return self.replicas


def assemble(
    settings: GatewaySettings,
    group: Group,
    replicas: Replicas,
    store: LogStore,
    metrics: GatewayMetrics,
    examples: bytes,
) -> Gateway:
    """Wire the request path bottom-up: fan-out, admission, lifecycle, data plane."""
    fanout = Fanout(group, replicas, metrics, settings)
    lag = LoopLag(observe=metrics.loop_lag.observe)
    admission = Admission(settings, group, metrics, lag, fanout.load, fanout.skipped)
    lifecycle = Lifecycle(fanout, group, metrics)
    dataplane = DataPlane(settings, group, admission, lifecycle, store)
    return Gateway(settings, group, replicas, fanout, store, metrics, lag, admission, lifecycle, dataplane, examples)
