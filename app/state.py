"""The gateway's shared state, created in the lifespan and handed to every handler."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.admission import LoopLag
from app.eventlog import LogStore
from app.fanout import Fanout
from app.group import Group
from app.lifecycle import Lifecycle
from app.metrics import GatewayMetrics
from app.replicas import ReplicaHealth
from app.settings import GatewaySettings
from app.upstream import ReplicaClient


@dataclass
class Gateway:
    settings: GatewaySettings
    group: Group
    client: ReplicaClient
    fanout: Fanout
    store: LogStore
    metrics: GatewayMetrics
    health: ReplicaHealth
    lifecycle: Lifecycle = field(init=False)
    lag: LoopLag = field(default_factory=LoopLag)
    inflight: int = 0
    open_streams: int = 0
    examples: bytes = b'{"examples": []}'  # the /v1/examples body (app/examples.py), encoded once

    def __post_init__(self) -> None:
        self.lifecycle = Lifecycle(self)
