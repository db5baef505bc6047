"""Load generation against a running gateway or worker: closed loop (fixed concurrency) and open
loop (Poisson arrivals at a set rate, which does not slow down when the server does).

Latencies are measured at the client: for JSON calls the whole response; for SSE the time of the
first complete answer (the first `coarse`/`refined`/`final` event) and of the terminal event.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson


@dataclass
class Sample:
    sent_at: float  # seconds since the run started
    first_ms: float  # first complete answer (JSON: the response)
    final_ms: float  # terminal event (JSON: the response)
    status: int
    outcome: str  # final | error | http_<status> | exception
    body: dict[str, Any] | None = None  # the terminal event's data


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0

    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.outcome == "final"]


def percentiles(values: Sequence[float], points: Sequence[float] = (50, 99, 99.9)) -> list[float]:
    if not values:
        return [float("nan")] * len(points)
    return [float(np.percentile(values, p)) for p in points]


def json_body(images: np.ndarray, parameters: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {
        "inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32", "data": images.ravel().tolist()}]
    }
    if parameters:
        body["parameters"] = parameters
    return orjson.dumps(body)


def binary_body(images: np.ndarray, parameters: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
    """The same request with the binary tensor extension both ways (→ body, headers), as Triton's
    client sends it: the JSON header, then the raw float32 images; outputs asked for binary."""
    data = np.ascontiguousarray(images, dtype="<f4").tobytes()
    tensor = {
        "name": "input",
        "shape": list(images.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": len(data)},
    }
    head = orjson.dumps({"inputs": [tensor], "parameters": {**(parameters or {}), "binary_data_output": True}})
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    return head + data, headers


Body = bytes | tuple[bytes, dict[str, str]]  # a JSON body, or a body with its own headers (binary)


async def send_one(session: aiohttp.ClientSession, url: str, body: Body, sse: bool, t0: float) -> Sample:
    start = time.perf_counter()
    headers = {"Content-Type": "application/json", **({"Accept": "text/event-stream"} if sse else {})}
    if isinstance(body, tuple):
        body, extra = body
        headers = {**headers, **extra}
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if not sse:
                data = await response.read()
                ms = (time.perf_counter() - start) * 1000
                length = response.headers.get("Inference-Header-Content-Length")
                try:
                    parsed = orjson.loads(data[: int(length)] if length else data) if data else None
                except orjson.JSONDecodeError:  # a peer's plain-text error (e.g. Ray's proxy time-out)
                    parsed = None
                outcome = "final" if response.status == 200 else f"http_{response.status}"
                return Sample(start - t0, ms, ms, response.status, outcome, parsed)
            if response.status != 200:  # refused or failed before the stream started: a JSON error
                await response.read()
                ms = (time.perf_counter() - start) * 1000
                return Sample(start - t0, ms, ms, response.status, f"http_{response.status}")
            return await _read_sse(response, start, t0)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        ms = (time.perf_counter() - start) * 1000
        return Sample(start - t0, ms, ms, 0, f"exception:{type(exc).__name__}")


async def _read_sse(response: aiohttp.ClientResponse, start: float, t0: float) -> Sample:
    """Time the first answer event and the terminal one; only the terminal event's JSON is parsed,
    so that the load generator spends as little CPU as it can on the machine it shares."""
    first = None
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        now = (time.perf_counter() - start) * 1000
        if first is None and (b"event: coarse" in buffer or b"event: refined" in buffer or b"event: final" in buffer):
            first = now
        for terminal in (b"event: final\n", b"event: error\n"):
            at = buffer.find(terminal)
            end = buffer.find(b"\n\n", at) if at >= 0 else -1
            if end >= 0:
                data = buffer[at:end].split(b"data: ", 1)[1]
                outcome = terminal[7:-1].decode()
                return Sample(
                    start - t0, first if first is not None else now, now, response.status, outcome, orjson.loads(data)
                )
        cut = buffer.rfind(b"\n\n")
        if cut >= 0 and first is not None:
            buffer = buffer[cut + 2 :]  # events already seen: keep only the unfinished one
    ms = (time.perf_counter() - start) * 1000
    return Sample(start - t0, ms, ms, response.status, "no_final")


@contextmanager
def collector_paused() -> Iterator[None]:
    """The load generator's own garbage collector off while it measures: its full collections walk
    every answer kept so far and stalled the sending loop for tens of milliseconds, which showed up
    in every server's tail alike. The answers it keeps are freed after the run."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


async def closed_loop(url: str, bodies: list[Body], concurrency: int, seconds: float, sse: bool = False) -> Run:
    """`concurrency` clients, each sending its next request as soon as the last one ends."""
    with collector_paused():
        return await _closed_loop(url, bodies, concurrency, seconds, sse)


async def _closed_loop(url: str, bodies: list[Body], concurrency: int, seconds: float, sse: bool) -> Run:
    run = Run()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        t0 = time.perf_counter()
        stop = t0 + seconds
        counter = iter(range(10**9))

        async def client() -> None:
            while time.perf_counter() < stop:
                run.samples.append(await send_one(session, url, bodies[next(counter) % len(bodies)], sse, t0))

        await asyncio.gather(*(client() for _ in range(concurrency)))
        run.seconds = time.perf_counter() - t0
    return run


async def open_loop(
    url: str,
    bodies: list[bytes],
    rate: float,
    count: int,
    sse: bool = False,
    seed: int = 0,
    on_send: Callable[[int], None] | None = None,
) -> Run:
    """`count` requests with exponential gaps at `rate` per second, whatever the server does."""
    with collector_paused():
        return await _open_loop(url, bodies, rate, count, sse, seed, on_send)


async def _open_loop(
    url: str,
    bodies: list[bytes],
    rate: float,
    count: int,
    sse: bool,
    seed: int,
    on_send: Callable[[int], None] | None,
) -> Run:
    run = Run()
    gaps = np.random.default_rng(seed).exponential(1 / rate, size=count)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        t0 = time.perf_counter()
        due = t0
        tasks = []
        for i, gap in enumerate(gaps):
            due += gap
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if on_send is not None:
                on_send(i)
            tasks.append(asyncio.create_task(send_one(session, url, bodies[i % len(bodies)], sse, t0)))
        run.samples = list(await asyncio.gather(*tasks))
        run.seconds = time.perf_counter() - t0
    return run


def replica_kernels(cluster: Any) -> dict[str, Any]:
    """Each replica's kernels per resolution and its int8 engine choice, from its own model metadata
    (`cluster`: an app.launcher.Cluster; a process hosting several models is asked for the first)."""
    import httpx

    out = {}
    for child in cluster.children:
        if child.name.startswith("gateway"):
            continue
        meta = httpx.get(f"{child.url}/v2/models/{child.name}", timeout=10).json()["parameters"]
        out[child.name] = {
            "kernels": meta.get("kernels"),
            "int8_engine": meta.get("int8_engine"),
            "resolutions": meta.get("resolutions"),  # which it serves, as it measured them (issue 31)
        }
    return out


def metric_sum(url: str, name: str, **labels: str) -> float:
    """Sum of every sample of the Prometheus metric `name` at `url`/metrics whose labels include `labels`
    (`name` may carry them itself: 'coinserve_worker_requests_total{outcome="stopped"}')."""
    import httpx

    if "{" in name:
        name, _, inline = name.partition("{")
        for pair in filter(None, inline.rstrip("}").split(",")):
            key, _, value = pair.partition("=")
            labels[key.strip()] = value.strip().strip('"')
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{", 1)[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total
