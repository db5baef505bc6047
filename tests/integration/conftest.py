"""Real processes on loopback: workers and a gateway started by the same launcher `coinserve up` uses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app import launcher
from bench.browser import BrowserMissingError, chromium
from bench.loadgen import metric_sum


@pytest.fixture(scope="session")
def coded_bundle(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle plus a COIN coded model (r = 1), as `coinserve code` would add it."""

    from models.bundle import open_bundle
    from models.coded import Ingredients, build_coded, members_of, write_coded
    from models.data import load_split

    path = Path(shutil.copytree(tiny_bundle_dir, tmp_path_factory.mktemp("served") / "bundle"))
    bundle = open_bundle(path)
    ingredients = Ingredients(bundle, members_of(bundle), calibration_images=200)
    test = load_split("test").head(100)
    write_coded(bundle, build_coded(ingredients, "coin", 3, 1), test)
    return path


def with_plan(bundle: Path, planes: list[int], tmp_path: Path) -> Path:
    """A copy of `bundle` that serves another refinement plan."""
    copy = Path(shutil.copytree(bundle, tmp_path / "plan-bundle"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["refinement"] = {"planes": planes, "per_channel": True, "final": "float32"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@dataclass
class Running:
    cluster: launcher.Cluster
    port: int
    grpc_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def child(self, name: str) -> launcher.Child:
        return next(c for c in self.cluster.children if c.name == name)

    def signal(self, name: str, sig: signal.Signals) -> None:
        os.kill(self.child(name).process.pid, sig)

    def worker_metric(self, name: str, metric: str) -> float:
        """Sum of every sample of `metric` on the worker's /metrics."""
        return metric_sum(self.child(name).url, metric)


@contextmanager
def running(
    bundle: Path,
    worker_env: dict[str, dict[str, str]] | None = None,
    gateway_args: list[str] | None = None,
    worker_args: dict[str, list[str]] | None = None,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    grpc: bool = False,
) -> Iterator[Running]:
    """The bundle's members, its COIN coded replica and a gateway, started and ready; `env` goes to
    every process, `worker_env`/`worker_args` to the named workers; `log_dir` collects their output;
    `grpc` gives the gateway a gRPC port of its own."""
    port = launcher.free_port()
    grpc_port = launcher.free_port() if grpc else 0
    # Every coarse resolution is served, whatever this machine measures it to cost (issue 31): the
    # suite's stream tests expect coarse events. The measured policy's tests set "measured".
    env = {"COINSERVE_WORKER_COARSE": "always", **(env or {})}
    cluster = launcher.start(
        bundle,
        port,
        worker_env=worker_env,
        gateway_args=gateway_args,
        worker_args=worker_args,
        env=env,
        log_dir=log_dir,
        grpc_port=grpc_port,
    )
    try:
        launcher.wait_ready(cluster, timeout_s=90)
        yield Running(cluster, port, grpc_port)
    finally:
        for child in cluster.children:  # a test may leave a worker paused
            if child.process.poll() is None:
                os.kill(child.process.pid, signal.SIGCONT)
        cluster.stop()


@pytest.fixture(scope="module")
def service(coded_bundle: Path) -> Iterator[Running]:
    with running(coded_bundle) as r:
        yield r


def request_body(n: int = 1, parameters: dict | None = None, seed: int = 0) -> dict:
    from models.data import load_split

    images = load_split("test").images[seed : seed + n]
    body: dict = {
        "inputs": [{"name": "input", "shape": [n, 1, 28, 28], "datatype": "FP32", "data": images.ravel().tolist()}]
    }
    if parameters:
        body["parameters"] = parameters
    return body


def parse_sse(text: str) -> list[dict]:
    """Events of a server-sent-event stream: [{'id': int, 'event': str, 'data': dict}], comments dropped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                key, _, value = line.partition(":")
                fields[key] = value.lstrip(" ")
        if "event" in fields:
            events.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return events


def argmaxes(data: dict) -> dict[str, int]:
    return {o["name"]: int(np.argmax(o["data"])) for o in data["outputs"]}


@dataclass
class BackgroundStream:
    """An SSE request read on its own thread: `coarse` is set when the coarse event arrives,
    `events` holds every event once the stream has ended (`join`)."""

    thread: threading.Thread
    events: list[dict]
    coarse: threading.Event

    def join(self, timeout: float) -> list[dict]:
        self.thread.join(timeout)
        return self.events


def stream_in_background(url: str, body: dict) -> BackgroundStream:
    events: list[dict] = []
    coarse = threading.Event()

    def read() -> None:
        text = ""
        headers = {"Accept": "text/event-stream"}
        with httpx.stream("POST", f"{url}/v2/models/fashion/infer", json=body, headers=headers, timeout=30) as r:
            for chunk in r.iter_text():
                text += chunk
                if "event: coarse" in text:
                    coarse.set()
        events.extend(parse_sse(text))

    stream = BackgroundStream(threading.Thread(target=read), events, coarse)
    stream.thread.start()
    return stream


@dataclass
class Public:
    """A service as outside clients see it: gRPC on, and pages from `allowed_origin` (not from
    `refused_origin`) may call it from a browser (COINSERVE_CORS_ORIGINS)."""

    service: Running
    allowed_port: int
    refused_port: int

    @property
    def allowed_origin(self) -> str:
        return f"http://127.0.0.1:{self.allowed_port}"

    @property
    def refused_origin(self) -> str:
        return f"http://127.0.0.1:{self.refused_port}"


@pytest.fixture(scope="session")
def public(coded_bundle: Path) -> Iterator[Public]:
    """One cluster for every third-party-client test (Triton's HTTP and gRPC clients, Chromium, the
    README's examples): each extra cluster costs ~10 s to start."""
    allowed, refused = launcher.free_port(), launcher.free_port()
    env = {
        "COINSERVE_CORS_ORIGINS": f"http://127.0.0.1:{allowed},http://localhost:{allowed}",
        # these tests are about the protocols, not overload: no 503 because a shared host runs late
        "COINSERVE_OVERLOAD_LAG_MS": "1000",
    }
    with running(coded_bundle, env=env, grpc=True) as service:
        yield Public(service, allowed, refused)


def images_of(n: int = 1, seed: int = 0) -> np.ndarray:
    """The first `n` test images from `seed`, (n, 1, 28, 28) float32: what `request_body` sends."""
    from models.data import load_split

    return np.ascontiguousarray(load_split("test").images[seed : seed + n], dtype=np.float32).reshape(n, 1, 28, 28)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium under selenium (bench/browser.py), one per test module."""
    try:
        driver = chromium()
    except BrowserMissingError as exc:
        pytest.fail(f"{exc} (./dev.sh test installs them)")
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class WorkerAnswers:
    answers: list[Any]  # app.channel.StepAnswer, in order
    errors: list[Any]  # app.errors.ReplicaError


def call_worker(
    child: launcher.Child,
    images: np.ndarray,
    final_only: bool = True,
    stop_margin: float | None = None,
    secret: str = "",
    timeout_s: float = 30.0,
) -> WorkerAnswers:
    """One call straight to a worker over its channel, with the gateway's own client (app/channel.py):
    every answer until its last one (or its failure). Raises what `dial` raises when the worker does
    not take the connection (a refused HELLO: NotWelcomedError)."""
    import asyncio
    import dataclasses
    from urllib.parse import urlsplit

    from app.channel import Call, ChannelConfig, Options, dial
    from protocol.channel import MAX_FRAME_BYTES

    parts = urlsplit(child.channel_url)
    out = WorkerAnswers([], [])

    class Sink:
        def __init__(self) -> None:
            self.done = asyncio.Event()

        def answered(self, call: Call, answer: Any) -> None:
            out.answers.append(answer)
            if answer.final or answer.stopped:
                self.done.set()

        def failed(self, call: Call, error: Any) -> None:
            out.errors.append(error)
            self.done.set()

    async def run() -> None:
        config = ChannelConfig(secret, "test", 0, 99, lambda welcome: None, 10.0, 10.0, MAX_FRAME_BYTES)
        channel = await dial(child.name, (str(parts.hostname), int(parts.port or 0)), config)
        assert channel.welcome is not None
        channel.config = dataclasses.replace(config, classes=channel.welcome.classes)
        try:
            sink = Sink()
            call = Call(child.name, child.name, len(images), sink)
            rows = np.ascontiguousarray(images, dtype="<f4").tobytes()
            channel.submit(call, rows, Options(0, final_only, stop_margin, None))
            await asyncio.wait_for(sink.done.wait(), timeout_s)
        finally:
            channel.close("done", quiet=True)

    asyncio.run(run())
    return out
