"""One replica process: serves one bundle model (a member or a coded model) over V2.

`create_app(settings)`: the lifespan loads and hash-checks the model (a failure stops the process
with a non-zero status), warms it up and starts the batcher. Streaming infer answers one NDJSON
line per completed resolution; a plain call answers the final one as JSON.

The worker reports its identity (DESIGN §3) in its readiness answer and its model metadata, so a
gateway can refuse a replica that serves another bundle, model or plan (a half-done rolling update).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp

from models.bitplanes import RefinementPlan
from models.bundle import MANIFEST, Bundle, open_bundle
from models.errors import BundleError
from models.refine import RefinementEngine
from models.runtime import keep_freed_memory, use_all_cores
from models.sources import examples
from protocol.spec import ModelSpec
from protocol.v2 import OUTPUT_NAME
from workers.batcher import Batcher
from workers.faults import FaultInjector
from workers.settings import WorkerSettings

logger = logging.getLogger(__name__)
PARAMETERS = ("stream", "min_resolution", "final_only", "stop_margin")
SECRET_HEADER = "X-Coinserve-Secret"


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rows = Counter(
            "coinserve_worker_rows_computed_total",
            "Image rows computed, per resolution",
            ["resolution"],
            registry=self.registry,
        )
        self.requests = Counter(
            "coinserve_worker_requests_total", "Infer requests by outcome", ["outcome"], registry=self.registry
        )
        self.batch = Histogram(
            "coinserve_worker_batch_rows",
            "Rows per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.compute = Counter(
            "coinserve_worker_compute_cpu_seconds_total",
            "CPU seconds of the compute thread in forward steps (thread time: the model's own work)",
            registry=self.registry,
        )
        self.in_flight = Gauge("coinserve_worker_in_flight_requests", "Requests being served", registry=self.registry)

    def computed(self, rows: int, index: int) -> None:
        self.rows.labels(str(index)).inc(rows)
        self.batch.observe(rows)


@dataclass
class Served:
    """One bundle model in this process: its manifest entry, engine and batcher."""

    name: str
    entry: dict[str, Any]
    engine: RefinementEngine
    batcher: Batcher


@dataclass
class WorkerState:
    settings: WorkerSettings
    bundle: Bundle
    models: dict[str, Served]
    faults: FaultInjector | None
    metrics: WorkerMetrics
    spec: ModelSpec  # the manifest's contract: input name, shape and datatype, classes and labels
    identity: dict[str, Any]  # what the gateway checks: {"bundle_sha256", "model", "refinement"}


def model_names(settings: WorkerSettings) -> list[str]:
    """`--model a` serves one model; `--model a,b,c` several (the hedging replica hosts every member)."""
    return [n.strip() for n in settings.model.split(",") if n.strip()]


def _serve_model(bundle: Bundle, name: str, settings: WorkerSettings, metrics: WorkerMetrics) -> Served:
    model = bundle.build_model(name)  # reads the file and checks its sha256 first
    plan = RefinementPlan.from_dict(bundle.manifest.get("refinement"))
    engine = RefinementEngine(model, plan, settings.int8_engine, _sample(bundle, settings.max_batch))
    if engine.engine_choice:  # said at any log level: which kernels serve is part of what was deployed
        logger.log(
            max(logger.getEffectiveLevel(), logging.INFO),
            "%s: resolutions on %s; int8 engine %s",
            name,
            engine.kernels,
            engine.engine_choice,
        )
    warm = torch.zeros(1, *bundle.spec.input.shape)
    for index in range(plan.resolutions):
        engine.forward(warm, index)
    step_delay_s = settings.faults.step_delay_ms / 1000
    batcher = Batcher(
        engine, settings.max_batch, settings.max_wait_ms, metrics.computed, step_delay_s, metrics.compute.inc
    )
    return Served(name, bundle.entry(name), engine, batcher)


def _sample(bundle: Bundle, rows: int) -> torch.Tensor:
    """A batch to time the int8 engines on: the bundle's examples repeated (real value ranges), else noise."""
    try:
        inputs = torch.from_numpy(examples(bundle).images.astype("float32"))
    except BundleError:
        return torch.randn(rows, *bundle.spec.input.shape)
    return inputs.repeat((rows + len(inputs) - 1) // len(inputs), *([1] * (inputs.dim() - 1)))[:rows]


def identity(manifest_bytes: bytes, names: list[str], plan: RefinementPlan) -> dict[str, Any]:
    """The replica's identity: the sha256 of the manifest bytes it loaded, the model it serves (the
    list, when it serves several) and its plan's planes."""
    return {
        "bundle_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "model": names[0] if len(names) == 1 else names,
        "refinement": list(plan.planes),
    }


def _load(settings: WorkerSettings, metrics: WorkerMetrics) -> WorkerState:
    use_all_cores(settings.threads)
    keep_freed_memory()
    bundle = open_bundle(settings.bundle, verify=False)
    manifest_bytes = (settings.bundle / MANIFEST).read_bytes()
    if json.loads(manifest_bytes) != bundle.manifest:  # the identity must name the manifest really loaded
        raise BundleError(f"{settings.bundle / MANIFEST} changed while the worker loaded it; start it again")
    names = model_names(settings)
    models = {name: _serve_model(bundle, name, settings, metrics) for name in names}
    faults = FaultInjector(settings.faults) if settings.faults.enabled else None
    plan = RefinementPlan.from_dict(bundle.manifest.get("refinement"))
    return WorkerState(settings, bundle, models, faults, metrics, bundle.spec, identity(manifest_bytes, names, plan))


def create_app(settings: WorkerSettings, drain: threading.Event | None = None) -> ASGIApp:
    metrics = WorkerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, WorkerState]]:
        state = await asyncio.to_thread(_load, settings, metrics)  # hashing and torch off the loop
        for served in state.models.values():
            await served.batcher.start()
        logger.info("serving %s from %s", list(state.models), settings.bundle)
        try:
            yield {"worker": state}
        finally:
            for served in state.models.values():
                await served.batcher.stop()

    app = FastAPI(title=f"coinserve worker {settings.model}", lifespan=lifespan, docs_url=None, redoc_url=None)
    _routes(app, settings, drain or threading.Event())
    from workers.endpoint import InferEndpoint  # it imports this module's WorkerState

    return InferEndpoint(app, model_names(settings))


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
        return JSONResponse({"ready": True, "identity": worker.identity})

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "coinserve-worker", "version": "0.1.0", "extensions": ["binary_tensor_data", "streaming"]}

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
                    "identity": worker.identity,
                    "labels": list(worker.spec.labels),
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
