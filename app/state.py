"""The gateway's shared state, created in the lifespan and handed to every handler."""

from __future__ import annotations

from dataclasses import dataclass

from app.fanout import Fanout
from app.group import Group
from app.metrics import GatewayMetrics
from app.replicas import ReplicaHealth
from app.settings import GatewaySettings
from app.streams import StreamRegistry
from app.upstream import ReplicaClient


@dataclass
class Gateway:
    settings: GatewaySettings
    group: Group
    client: ReplicaClient
    fanout: Fanout
    registry: StreamRegistry
    metrics: GatewayMetrics
    health: ReplicaHealth
    inflight: int = 0
    open_streams: int = 0
