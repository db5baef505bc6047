"""What one replica process holds: its bundle models (engine and batcher each), its metrics, its
identity (DESIGN §3), and how it loads them. The channel (workers/channel.py) and the HTTP routes
(workers/server.py) both read it; it imports neither."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from models.bitplanes import RefinementPlan
from models.bundle import MANIFEST, Bundle, open_bundle
from models.errors import BundleError
from models.refine import RefinementEngine
from models.runtime import keep_freed_memory, use_all_cores
from models.sources import examples
from protocol.spec import ModelSpec
from workers.batcher import Batcher, Job, StepResults
from workers.faults import FaultInjector
from workers.settings import WorkerSettings

logger = logging.getLogger(__name__)
OUTCOMES = ("ok", "stopped", "cancelled", "expired", "error", "bad_request", "injected_error", "garbage")


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
            "coinserve_worker_requests_total", "Calls by outcome", ["outcome"], registry=self.registry
        )
        self.outcome = {name: self.requests.labels(name) for name in OUTCOMES}  # children bound once
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
        self.in_flight = Gauge("coinserve_worker_in_flight_requests", "Calls being served", registry=self.registry)
        self.frames = Counter(
            "coinserve_worker_frames_total", "Channel frames, by direction", ["direction"], registry=self.registry
        )
        self.frames_in, self.frames_out = self.frames.labels("in"), self.frames.labels("out")
        self.connections = Gauge(
            "coinserve_worker_channel_connections", "Open gateway channels (after HELLO)", registry=self.registry
        )
        self._rows: dict[int, Any] = {}

    def computed(self, rows: int, index: int) -> None:
        child = self._rows.get(index)
        if child is None:
            child = self._rows[index] = self.rows.labels(str(index))
        child.inc(rows)
        self.batch.observe(rows)


@dataclass
class Served:
    """One bundle model in this process: its manifest entry, engine and batcher."""

    name: str
    entry: dict[str, Any]
    engine: RefinementEngine
    batcher: Batcher
    warm_ms: list[float] = field(default_factory=list)  # its warm-up: fastest batch-1 ms per resolution


@dataclass
class Dispatch:
    """Where every batcher's output goes: set by the channel server before any job is submitted."""

    on_results: Any = None  # Callable[[StepResults], None]
    on_failure: Any = None  # Callable[[list[Job], Exception], None]
    on_dropped: Any = None  # Callable[[Job], None]

    def results(self, results: StepResults) -> None:
        self.on_results(results)

    def failure(self, jobs: list[Job], exc: Exception) -> None:
        self.on_failure(jobs, exc)

    def dropped(self, job: Job) -> None:
        self.on_dropped(job)


@dataclass
class WorkerState:
    settings: WorkerSettings
    bundle: Bundle
    models: dict[str, Served]
    faults: FaultInjector | None
    metrics: WorkerMetrics
    spec: ModelSpec  # the manifest's contract: input name, shape and datatype, classes and labels
    identity: dict[str, Any]  # what the gateway checks: {"bundle_sha256", "model", "refinement"}
    dispatch: Dispatch = field(default_factory=Dispatch)
    drain: threading.Event = field(default_factory=threading.Event)  # set on SIGTERM: take nothing new


def model_names(settings: WorkerSettings) -> list[str]:
    """`--model a` serves one model; `--model a,b,c` several (the hedging replica hosts every member)."""
    return [n.strip() for n in settings.model.split(",") if n.strip()]


def _serve_model(
    bundle: Bundle, name: str, settings: WorkerSettings, metrics: WorkerMetrics, dispatch: Dispatch
) -> Served:
    model = bundle.build_model(name)  # reads the file and checks its sha256 first
    plan = RefinementPlan.from_dict(bundle.manifest.get("refinement"))
    sample = _sample(bundle, settings.max_batch)
    engine = RefinementEngine(model, plan, settings.int8_engine, sample)
    if engine.engine_choice:  # a routine start-up fact: shown with --log-level info (`coinserve up` too)
        logger.info("%s: resolutions on %s; int8 engine %s", name, engine.kernels, engine.engine_choice)
    batcher = Batcher(
        engine,
        settings.max_batch,
        settings.max_wait_ms,
        on_results=dispatch.results,
        on_failure=dispatch.failure,
        on_compute=metrics.computed,
        step_delay_s=settings.faults.step_delay_ms / 1000,
        on_cpu=metrics.compute.inc,
        on_dropped=dispatch.dropped,
        measured=settings.coarse == "measured",
        probe_idle_s=settings.probe_idle_ms / 1000,
        probe_every_s=settings.probe_every_s,
        pass_delay=settings.faults.pass_delay_s(),
    )
    warm_ms = batcher.warm_up(sample)  # in the compute thread, before readiness: no cold first call
    logger.info("%s: warm; batch-1 ms per resolution %s; %s", name, warm_ms, batcher.costs.reasons)
    return Served(name, bundle.entry(name), engine, batcher, warm_ms)


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


def load(settings: WorkerSettings, metrics: WorkerMetrics) -> WorkerState:
    """Read and check the bundle, build and warm every model (blocking: call it off the loop)."""
    use_all_cores(settings.threads)
    keep_freed_memory()
    bundle = open_bundle(settings.bundle, verify=False)
    manifest_bytes = (settings.bundle / MANIFEST).read_bytes()
    if json.loads(manifest_bytes) != bundle.manifest:  # the identity must name the manifest really loaded
        raise BundleError(f"{settings.bundle / MANIFEST} changed while the worker loaded it; start it again")
    names = model_names(settings)
    dispatch = Dispatch()
    models = {name: _serve_model(bundle, name, settings, metrics, dispatch) for name in names}
    faults = FaultInjector(settings.faults) if settings.faults.enabled else None
    plan = RefinementPlan.from_dict(bundle.manifest.get("refinement"))
    ident = identity(manifest_bytes, names, plan)
    return WorkerState(settings, bundle, models, faults, metrics, bundle.spec, ident, dispatch)
