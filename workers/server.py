"""One replica process: serves one bundle model (a member or a coded model), or several (the hedging
replica), to gateways over the channel (workers/channel.py), and over HTTP its health, metadata and
metrics, so probes and scraping work as for any OIP server.

`create_app(settings)`: the lifespan loads and hash-checks the model (a failure stops the process
with a non-zero status), warms it up, starts the batchers and opens the channel port; readiness
passes only then. The worker reports its identity (DESIGN §3) in its readiness answer, its model
metadata and the channel's `Welcome`, so a gateway can refuse a replica that serves another
bundle, model or plan (a half-done rolling update).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from protocol.v2 import OUTPUT_NAME
from workers.channel import ChannelServer
from workers.settings import WorkerSettings
from workers.state import WorkerMetrics, WorkerState, load, model_names

logger = logging.getLogger(__name__)


def create_app(settings: WorkerSettings, drain: threading.Event | None = None) -> FastAPI:
    metrics = WorkerMetrics()
    drain = drain or threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, WorkerState]]:
        state = await asyncio.to_thread(load, settings, metrics)  # hashing and torch off the loop
        state.drain = drain
        channel = ChannelServer(state)
        for served in state.models.values():
            await served.batcher.start()
        await channel.start(settings.host, settings.channel)
        logger.info("serving %s from %s; channel on port %d", list(state.models), settings.bundle, settings.channel)
        gc.freeze()  # the model and the imports live as long as the process: no full collection walks them
        gc.set_threshold(10_000, 10, 10)  # a call leaves almost no cyclic garbage: young collections can be rare
        try:
            yield {"worker": state}
        finally:
            await channel.close(grace_s=settings.graceful_s)
            for served in state.models.values():
                await served.batcher.stop()

    app = FastAPI(title=f"coinserve worker {settings.model}", lifespan=lifespan, docs_url=None, redoc_url=None)
    _routes(app, settings, drain)
    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _routes(app: FastAPI, settings: WorkerSettings, drain: threading.Event) -> None:
    names = model_names(settings)

    def unknown(model: str) -> JSONResponse:
        return _error(404, f"this worker serves {names}, not {model!r}")

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(request: Request) -> Response:
        if drain.is_set():
            return JSONResponse({"ready": False, "error": "draining: shutting down"}, status_code=503)
        worker: WorkerState | None = getattr(request.state, "worker", None)
        if worker is None:
            return JSONResponse({"ready": False})
        warm_up = {name: {"batch_1_ms": served.warm_ms} for name, served in worker.models.items()}
        return JSONResponse(
            {"ready": True, "identity": worker.identity, "channel_port": settings.channel, "warm_up": warm_up}
        )

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "coinserve-worker", "version": "0.1.0", "extensions": ["coinserve_channel"]}

    @app.get("/v2/models/{model}")
    async def model_metadata(model: str, request: Request) -> Response:
        worker: WorkerState = request.state.worker
        if model not in worker.models:
            return unknown(model)
        served = worker.models[model]
        entry = served.entry
        return JSONResponse(
            {
                "name": model,
                "platform": "pytorch",
                "inputs": [worker.spec.input.metadata()],
                "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, worker.spec.classes]}],
                "parameters": {
                    "role": "coded" if "method" in entry else "member",
                    "sha256": entry["sha256"],
                    "coefficients": entry.get("coefficients"),
                    "refinement": served.engine.plan.to_dict(),
                    "kernels": served.engine.kernels,
                    "int8_engine": served.engine.engine_choice or None,
                    "warm_batch_1_ms": served.warm_ms,
                    "resolutions": served.batcher.costs.report(),
                    "identity": worker.identity,
                    "labels": list(worker.spec.labels),
                    "channel_port": settings.channel,
                },
            }
        )

    @app.get("/v2/models/{model}/ready")
    async def model_ready(model: str) -> Response:
        if model not in names:
            return unknown(model)
        return JSONResponse({"name": model, "ready": True})

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(request.state.worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)
