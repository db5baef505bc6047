"""Serving benchmark (issue 5): gateway overhead, throughput, and the deadline under a paused member.

    python -m bench.serving [--quick] [--json docs/results/serving.json]

1. Overhead: a trivial bundle (MLP members, k = 4, one coded replica). p50 at concurrency 1 through
   the gateway against p50 of calling one worker directly with the same JSON request.
2. Throughput: the default CNN bundle, k = 4 + 1 coded, closed loop at concurrency 32.
3. Deadline: the default bundle, member-1 paused with SIGSTOP for the whole run, Poisson arrivals,
   SSE requests with deadline_ms; (a) the coded replica up: time of the final; (b) the coded replica
   paused too: the terminal event must come at the deadline.
4. Overload: the default bundle; capacity measured closed-loop (concurrency 32, load shedding off)
   with JSON requests carrying deadline_ms = 300, then, on a fresh cluster with the defaults,
   open-loop Poisson arrivals at twice that rate for 60 s. Every request is timed by the load
   generator's clock from the moment it is sent: admitted requests must end within deadline
   + 50 ms (p99) and + 100 ms (p99.9), refused ones (429/503) within 50 ms, none lost; the
   gateway's resident memory is sampled throughout. The per-request samples are written next to
   the JSON (`<json stem>_overload_raw.json.gz`).
5. Binary (issue 14): the default bundle; JSON against the binary tensor extension (both ways, as
   Triton's client sends it), in the same run, trials interleaved (order alternating): one image
   per request, closed loop at concurrency 32 (gateway throughput: answered requests per second;
   bodies encoded beforehand), and 64 images per request one after another, timed from numpy
   images to numpy answers (the client's encoding and decoding count, as they do for a user).
Every trial is printed as it ends; the machine and settings head the output.

    python -m bench.serving --only binary --json docs/results/binary.json

    python -m bench.serving --only overload --json docs/results/overload.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from app import launcher
from bench.loadgen import Run, binary_body, closed_loop, json_body, open_loop, percentiles
from models.data import load_split
from models.machine import machine

SECTIONS = ("overhead", "throughput", "deadline", "overload", "binary")


def trivial_bundle(folder: Path) -> Path:
    """A real bundle whose models cost next to nothing: an MLP trained for a few steps, coded by averaging."""

    from models.bundle import open_bundle
    from models.coded import Ingredients, build_coded, members_of, write_coded
    from models.train import TrainingConfig, train_bundle

    cfg = TrainingConfig(architecture="mlp", k=4, base_epochs=1, member_steps=2, train_limit=1000, test_limit=200)
    train_bundle(folder, cfg, log=lambda _m: None)
    bundle = open_bundle(folder)
    test = load_split("test").head(200)
    coded = build_coded(Ingredients(bundle, members_of(bundle), calibrate=False), "average", 4, 1)
    write_coded(bundle, coded, test)
    return folder


def bodies(n: int = 64, parameters: dict[str, Any] | None = None) -> list[bytes]:
    images = load_split("test").images[:n]
    return [json_body(images[i : i + 1], parameters) for i in range(n)]


def summary(run: Run, deadline_ms: float | None = None) -> dict[str, Any]:
    ok = run.ok()
    first = [s.first_ms for s in ok]
    final = [s.final_ms for s in run.samples]
    p50, p99, p999 = percentiles(first)
    out = {
        "requests": len(run.samples),
        "finals": len(ok),
        "errors": len(run.samples) - len(ok),
        "req_per_s": round(len(run.samples) / run.seconds, 1),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "p999_ms": round(p999, 2),
        "terminal_p50_ms": round(percentiles(final)[0], 2),
        "terminal_p99_ms": round(percentiles(final)[1], 2),
        "terminal_max_ms": round(max(final, default=float("nan")), 2),
    }
    if deadline_ms is not None:
        out["late_p99_ms"] = round(percentiles([f - deadline_ms for f in final])[1], 2)
        decoded = [s for s in ok if s.body and s.body.get("parameters", {}).get("decoded_members")]
        out["decoded"] = len(decoded)
    return out


def _log(label: str, result: dict[str, Any]) -> None:
    print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in result.items()), flush=True)


async def direct_calls(worker: launcher.Child, images: np.ndarray, seconds: float) -> list[float]:
    """One call at a time straight to a worker over its channel, with the gateway's own client
    (app/channel.py): the milliseconds of each, from submit to its answer."""
    from urllib.parse import urlsplit

    from app.channel import Call, ChannelConfig, Options, dial
    from protocol.channel import MAX_FRAME_BYTES

    parts = urlsplit(worker.channel_url)
    config = ChannelConfig("", "bench", 0, 99, lambda welcome: None, 10.0, 10.0, MAX_FRAME_BYTES)
    channel = await dial(worker.name, (str(parts.hostname), int(parts.port or 0)), config)
    assert channel.welcome is not None
    channel.config = dataclasses.replace(config, classes=channel.welcome.classes)
    times: list[float] = []

    class Sink:
        def answered(self, call: Call, answer: Any) -> None:
            self.done.set_result(None)

        def failed(self, call: Call, error: Any) -> None:
            self.done.set_exception(RuntimeError(str(error)))

    try:
        end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < end:
            sink = Sink()
            sink.done = asyncio.get_running_loop().create_future()
            start = time.perf_counter()
            rows = np.ascontiguousarray(images[i % len(images)][None], dtype="<f4").tobytes()
            channel.submit(Call(worker.name, worker.name, 1, sink), rows, Options())
            await sink.done
            times.append((time.perf_counter() - start) * 1000)
            i += 1
    finally:
        channel.close("done", quiet=True)
    return times


def overhead(trials: int, seconds: float) -> dict[str, Any]:
    """The gateway's p50 (HTTP, JSON, k + 1 worker calls) against one worker called directly over
    its channel (no HTTP, no JSON), one request at a time, on a trivial model."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = trivial_bundle(Path(tmp) / "trivial")
        cluster = launcher.start(bundle, launcher.free_port())
        try:
            launcher.wait_ready(cluster)
            gateway = cluster.children[-1]
            worker = cluster.children[0]
            gateway_url = f"{gateway.url}/v2/models/fashion/infer"
            reqs = bodies()
            images = load_split("test").images[:64]
            asyncio.run(closed_loop(gateway_url, reqs, 4, 2.0))  # warm-up
            rows = []
            for trial in range(trials):
                direct = {"p50_ms": round(percentiles(asyncio.run(direct_calls(worker, images, seconds)))[0], 2)}
                via = summary(asyncio.run(closed_loop(gateway_url, reqs, 1, seconds)))
                row = {"trial": trial, "direct_p50_ms": direct["p50_ms"], "gateway_p50_ms": via["p50_ms"]}
                row["ratio"] = round(via["p50_ms"] / direct["p50_ms"], 2)
                _log(f"overhead trial {trial}", row)
                rows.append(row)
        finally:
            cluster.stop()
    return {"trials": rows, "median_ratio": float(np.median([r["ratio"] for r in rows]))}


def default_cluster(bundle: Path) -> launcher.Cluster:
    cluster = launcher.start(bundle, launcher.free_port())
    launcher.wait_ready(cluster)
    return cluster


def throughput(bundle: Path, trials: int, seconds: float, concurrency: int = 32) -> dict[str, Any]:
    cluster = default_cluster(bundle)
    try:
        url = f"{cluster.children[-1].url}/v2/models/fashion/infer"
        reqs = bodies()
        asyncio.run(closed_loop(url, reqs, concurrency, 3.0))  # warm-up
        rows = []
        for trial in range(trials):
            row = {"trial": trial, **summary(asyncio.run(closed_loop(url, reqs, concurrency, seconds)))}
            _log(f"throughput trial {trial}", row)
            rows.append(row)
    finally:
        cluster.stop()
    return {
        "concurrency": concurrency,
        "trials": rows,
        "median_req_per_s": float(np.median([r["req_per_s"] for r in rows])),
    }


async def _numpy_round_trips(url: str, images: np.ndarray, kind: str, seconds: float) -> list[float]:
    """Sequential requests timed from numpy images to numpy answers: the client's encoding and
    decoding count (orjson for JSON, the fastest a Python client has), as they do for a user."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        times: list[float] = []
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            start = time.perf_counter()
            if kind == "json":
                body, headers = json_body(images), {"Content-Type": "application/json"}
            else:
                body, headers = binary_body(images)
            async with session.post(url, data=body, headers=headers) as response:
                data = await response.read()
                length = response.headers.get("Inference-Header-Content-Length")
            if response.status != 200:
                continue
            if length is None:
                answer = orjson.loads(data)
                ensemble = np.asarray(answer["outputs"][-1]["data"], np.float32).reshape(answer["outputs"][-1]["shape"])
            else:
                head = orjson.loads(data[: int(length)])
                size = sum(o["parameters"]["binary_data_size"] for o in head["outputs"][:-1])
                ensemble = np.frombuffer(data, "<f4", offset=int(length) + size).reshape(head["outputs"][-1]["shape"])
            assert ensemble.shape == (len(images), ensemble.shape[1])
            times.append((time.perf_counter() - start) * 1000)
    return times


def parse_cost_us(images: np.ndarray, repeats: int = 30) -> dict[str, float]:
    """The gateway's parser alone (protocol/v2.py `parse_infer`), JSON against binary, in this
    process: the best of `repeats` timings in µs (the minimum is what contention cannot inflate)."""
    from protocol.spec import InputSpec
    from protocol.v2 import parse_infer

    spec = InputSpec("input", tuple(images.shape[1:]))
    jbody = json_body(images)
    bbody, headers = binary_body(images)
    length = int(headers["Inference-Header-Content-Length"])
    out = {}
    for kind, body, size in (("json", jbody, None), ("binary", bbody, length)):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            parse_infer(body, size, 64, ("deadline_ms",), spec)
            best = min(best, time.perf_counter() - start)
        out[f"{kind}_us"] = round(best * 1e6, 1)
    return out


def binary(bundle: Path, trials: int, seconds: float, concurrency: int = 32, batch: int = 64) -> dict[str, Any]:
    parse = {f"batch{n}": parse_cost_us(load_split("test").images[:n]) for n in (1, batch)}
    _log("binary parse cost", parse)
    # No refusals for loop lag here: this section compares what the gateway gets through with each
    # encoding, and on a shared 2-core host the lag guard would refuse instead (the refusals are
    # the overload section's subject).
    cluster = launcher.start(bundle, launcher.free_port(), env={"COINSERVE_OVERLOAD_LAG_MS": "100000"})
    launcher.wait_ready(cluster)
    try:
        url = f"{cluster.children[-1].url}/v2/models/fashion/infer"
        images = load_split("test").images
        singles = {
            "json": [json_body(images[i : i + 1]) for i in range(64)],
            "binary": [binary_body(images[i : i + 1]) for i in range(64)],
        }
        for kind in ("json", "binary"):  # warm-up
            asyncio.run(closed_loop(url, singles[kind], concurrency, 2.0))
            asyncio.run(_numpy_round_trips(url, images[:batch], kind, 2.0))
        rows: list[dict[str, Any]] = []
        for trial in range(trials):
            for kind in ("json", "binary") if trial % 2 == 0 else ("binary", "json"):
                run = asyncio.run(closed_loop(url, singles[kind], concurrency, seconds))
                times = asyncio.run(_numpy_round_trips(url, images[trial * batch : (trial + 1) * batch], kind, seconds))
                p50, p99, _ = percentiles(times)
                row = {
                    "trial": trial,
                    "kind": kind,
                    "c32_ok_per_s": round(len(run.ok()) / run.seconds, 1),
                    "c32_refused": len(run.samples) - len(run.ok()),
                    "c32_p50_ms": round(percentiles([s.final_ms for s in run.ok()])[0], 2),
                    "batch64_requests": len(times),
                    "batch64_p50_ms": round(p50, 2),
                    "batch64_p99_ms": round(p99, 2),
                }
                _log(f"binary trial {trial}", row)
                rows.append(row)
    finally:
        cluster.stop()

    def median(kind: str, key: str) -> float:
        return float(np.median([r[key] for r in rows if r["kind"] == kind]))

    out: dict[str, Any] = {"concurrency": concurrency, "batch": batch, "parse_cost": parse, "trials": rows}
    for kind in ("json", "binary"):
        out[f"{kind}_c32_ok_per_s"] = median(kind, "c32_ok_per_s")
        out[f"{kind}_batch64_p50_ms"] = median(kind, "batch64_p50_ms")
    out["c32_throughput_ratio"] = round(out["binary_c32_ok_per_s"] / out["json_c32_ok_per_s"], 3)
    out["batch64_speedup"] = round(out["json_batch64_p50_ms"] / out["binary_batch64_p50_ms"], 3)
    _log("binary", {k: v for k, v in out.items() if k != "trials"})
    return out


def deadline(bundle: Path, trials: int, count: int, rate: float, deadline_ms: float) -> dict[str, Any]:
    cluster = default_cluster(bundle)
    pids = {c.name: c.process.pid for c in cluster.children}
    coded = next(name for name in pids if name.startswith("coded-"))  # the bundle's first coded replica
    out: dict[str, Any] = {"deadline_ms": deadline_ms, "rate_per_s": rate, "requests_per_trial": count}
    try:
        url = f"{cluster.children[-1].url}/v2/models/fashion/infer"
        reqs = bodies(64, {"deadline_ms": deadline_ms})
        asyncio.run(closed_loop(url, reqs, 4, 2.0))  # warm-up
        for case, paused in (
            ("paused_member", ["member-1"]),
            ("paused_member_and_coded", ["member-1", coded]),
        ):
            for name in paused:
                os.kill(pids[name], signal.SIGSTOP)
            try:
                rows = []
                for trial in range(trials):
                    row = {
                        "trial": trial,
                        **summary(asyncio.run(open_loop(url, reqs, rate, count, sse=True, seed=trial)), deadline_ms),
                    }
                    _log(f"deadline {case} trial {trial}", row)
                    rows.append(row)
            finally:
                for name in paused:
                    os.kill(pids[name], signal.SIGCONT)
            out[case] = rows
            time.sleep(2.0)  # let the resumed replicas drain what they held
    finally:
        cluster.stop()
    return out


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def overload(
    bundle: Path, seconds: float, factor: float = 2.0, deadline_ms: float = 300.0, raw: Path | None = None
) -> dict[str, Any]:
    """Open-loop load at `factor` × the measured capacity, every request with `deadline_ms`."""
    import gzip
    import threading

    reqs = bodies(64, {"deadline_ms": deadline_ms})
    # Capacity: closed loop at concurrency 32 with load shedding off (a refused request would come
    # straight back and the probe would measure its own refusal storm).
    probe_cluster = launcher.start(bundle, launcher.free_port(), env={"COINSERVE_OVERLOAD_LAG_MS": "1e9"})
    try:
        launcher.wait_ready(probe_cluster)
        probe_url = f"{probe_cluster.children[-1].url}/v2/models/fashion/infer"
        asyncio.run(closed_loop(probe_url, reqs, 8, 2.0))  # warm-up
        probe = asyncio.run(closed_loop(probe_url, reqs, 32, 8.0))
    finally:
        probe_cluster.stop()
    capacity = len([s for s in probe.samples if s.status == 200]) / probe.seconds
    rate = factor * capacity
    cluster = default_cluster(bundle)
    gateway = cluster.children[-1]
    try:
        url = f"{gateway.url}/v2/models/fashion/infer"
        asyncio.run(closed_loop(url, reqs, 4, 2.0))  # warm-up
        count = int(rate * seconds)
        rss: list[tuple[float, float]] = []
        stop = threading.Event()
        t0 = time.perf_counter()

        def sample_rss() -> None:
            while not stop.wait(1.0):
                mib = _rss_mib(gateway.process.pid)
                if mib is not None:
                    rss.append((round(time.perf_counter() - t0, 1), round(mib, 2)))

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        try:
            run = asyncio.run(open_loop(url, reqs, rate, count, seed=0))
        finally:
            stop.set()
            sampler.join()
        overrun = overrun_buckets(gateway.url)
    finally:
        cluster.stop()
    refused = [s for s in run.samples if s.status in (429, 503)]
    admitted = [s for s in run.samples if s.status not in (429, 503, 0)]
    lost = [s for s in run.samples if s.status == 0]
    late = [s.final_ms - deadline_ms for s in admitted]
    answered = [s for s in admitted if s.status == 200]
    approximate = [s for s in answered if (s.body or {}).get("parameters", {}).get("approximate")]
    first = [v for t, v in rss if t <= 10.0] or [float("nan")]
    last = [v for t, v in rss if t >= run.seconds - 10.0] or [float("nan")]
    result = {
        "deadline_ms": deadline_ms,
        "capacity_req_per_s": round(capacity, 1),
        "factor": factor,
        "rate_per_s": round(rate, 1),
        "seconds": round(run.seconds, 1),
        "sent": len(run.samples),
        "admitted": len(admitted),
        "answered_200": len(answered),
        "approximate_200": len(approximate),
        "admitted_errors": dict(Counter(s.status for s in admitted if s.status != 200)),
        "refused": dict(Counter(s.status for s in refused)),
        "lost": len(lost),
        "lost_outcomes": dict(Counter(s.outcome for s in lost)),
        "admitted_late_ms": dict(zip(("p50", "p99", "p999"), (round(v, 2) for v in percentiles(late)), strict=True)),
        "admitted_late_max_ms": round(max(late, default=float("nan")), 2),
        "admitted_ci95_p99_late_ms": bootstrap_ci(late, 99),
        "admitted_ci95_p999_late_ms": bootstrap_ci(late, 99.9),
        "refused_ms": dict(
            zip(("p50", "p99", "p999"), (round(v, 2) for v in percentiles([s.final_ms for s in refused])), strict=True)
        ),
        "refused_max_ms": round(max((s.final_ms for s in refused), default=float("nan")), 2),
        "gateway_overrun_buckets": overrun,
        "gateway_rss_mib_first_10s": round(float(np.median(first)), 2),
        "gateway_rss_mib_last_10s": round(float(np.median(last)), 2),
        "gateway_rss_series": rss,
    }
    if raw is not None:
        rows = [(round(s.sent_at, 4), round(s.final_ms, 3), s.status, s.outcome) for s in run.samples]
        raw.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(raw, "wt") as f:
            json.dump({"columns": ["sent_at_s", "client_ms", "status", "outcome"], "rows": rows}, f)
    _log("overload", {k: v for k, v in result.items() if k != "gateway_rss_series"})
    return result


def overrun_buckets(gateway_url: str) -> dict[str, float]:
    """The gateway's own count of how late past its deadline each admitted request's terminal event
    was written (coinserve_deadline_overrun_seconds): the share of requests within each bound, by
    the server's clock, apart from the load generator's (which shares the two cores)."""
    import httpx

    counts: dict[str, float] = {}
    for line in httpx.get(f"{gateway_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("coinserve_deadline_overrun_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            counts[bound] = float(line.rsplit(" ", 1)[1])
    total = counts.get("+Inf", 0.0) or 1.0
    return {f"within_{b}_s": round(n / total, 5) for b, n in counts.items()} | {"requests": counts.get("+Inf", 0.0)}


def bootstrap_ci(values: list[float], q: float, draws: int = 1000, seed: int = 0) -> list[float] | None:
    """A 95% bootstrap interval of the q-th percentile."""
    if len(values) < 10:
        return None
    rng = np.random.default_rng(seed)
    data = np.asarray(values)
    stats = np.percentile(rng.choice(data, size=(draws, len(data)), replace=True), q, axis=1)
    return [round(float(v), 2) for v in np.percentile(stats, [2.5, 97.5])]


def _no_nan(value: Any) -> Any:
    """NaN (a percentile of no samples) becomes null: strict JSON readers refuse NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


# the opening of `coinserve bench serving --help`: one full sentence
DESCRIPTION = (
    "Measure the serving path: gateway overhead, throughput, and the deadline kept under a paused member (issue 5)."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--bundle", type=Path, default=Path(os.environ.get("COINSERVE_BUNDLE", "bundles/default")))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="one short trial of each (a smoke test)")
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only these sections (repeat; default: all)"
    )
    args = parser.parse_args()
    trials, seconds, count = (1, 3.0, 100) if args.quick else (3, 15.0, 400)
    only = args.only or list(SECTIONS)
    report: dict[str, Any] = {"machine": machine(), "quick": args.quick}
    print(json.dumps(report["machine"]), flush=True)
    if "overhead" in only:
        report["overhead"] = overhead(trials, seconds)
    if "throughput" in only:
        report["throughput"] = throughput(args.bundle, trials, seconds)
    if "deadline" in only:
        report["deadline"] = deadline(args.bundle, trials, count, rate=40.0, deadline_ms=200.0)
    if "overload" in only:
        raw = args.json.with_name(args.json.stem + "_overload_raw.json.gz") if args.json else None
        report["overload"] = overload(args.bundle, 10.0 if args.quick else 60.0, raw=raw)
    if "binary" in only:
        report["binary"] = binary(args.bundle, 2 if args.quick else 10, 3.0 if args.quick else 4.0)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_no_nan(report), indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
