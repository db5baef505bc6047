"""`create_app(settings)`: the gateway. The lifespan creates the shared upstream client, the request
event-log store and the replica health checks, and hands them to the handlers as typed state."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import disable_created_metrics

from app.access import AccessLogMiddleware
from app.errors import install_handlers
from app.eventlog import MemoryStore
from app.fanout import Fanout
from app.group import load_group
from app.memory import trim_periodically
from app.metrics import GatewayMetrics
from app.replicas import ReplicaHealth
from app.routes import health, infer, requests
from app.settings import GatewaySettings
from app.state import Gateway
from app.upstream import ReplicaClient

logger = logging.getLogger(__name__)


def create_app(settings: GatewaySettings, drain: threading.Event | None = None) -> FastAPI:
    group = load_group(settings)  # fail at start, not on the first request
    drain = drain or threading.Event()
    disable_created_metrics()  # type: ignore[no-untyped-call]
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Gateway]]:
        client = ReplicaClient(settings)
        health_checks = ReplicaHealth(group, client, metrics, drain)
        store = MemoryStore(settings.retention_s, settings.retention_max)
        fanout = Fanout(group, client, metrics, health_checks)
        gateway = Gateway(settings, group, client, fanout, store, metrics, health_checks)
        await health_checks.check_all()
        await health_checks.start()
        trimmer = asyncio.create_task(trim_periodically(5.0), name="malloc-trim")
        gateway.lag.observe = metrics.loop_lag.observe
        gateway.lag.start()
        logger.info("gateway for %s: members %s, coded %s", group.name, group.members, list(group.coded))
        try:
            yield {"gateway": gateway}
        finally:
            trimmer.cancel()
            await gateway.lag.stop()
            await health_checks.stop()
            await gateway.lifecycle.close()
            await client.close()

    app = FastAPI(title="coinserve gateway", version="0.1.0", lifespan=lifespan)
    _routes(app)
    app.add_middleware(AccessLogMiddleware, max_body_bytes=settings.max_body_bytes)
    return app


def _routes(app: FastAPI) -> None:
    install_handlers(app)
    app.include_router(health.router)
    app.include_router(infer.router)
    app.include_router(requests.router)


def openapi_document() -> dict[str, Any]:
    """The gateway's OpenAPI schema, without a bundle or replicas (for docs and schema fuzzing)."""
    app = FastAPI(title="coinserve gateway", version="0.1.0")
    _routes(app)
    return app.openapi()
