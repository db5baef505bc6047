"""What `stop_margin` saves in the workers (issue 17): CPU seconds per request, measured in the
workers, and the served accuracy on the test split.

    python -m bench.stop_margin [--bundle bundles/wide] [--json docs/results/stop_margin.json]
    python -m bench.stop_margin --quick          (a smoke test: 200 images, one round)

Arms, each sending every chosen test image once per round as its own request (batch 1, closed loop
at `--concurrency`), rounds interleaved so that drifts of the machine hit every arm alike:

- `one-shot`: a plain JSON call (the workers compute the float32 resolution only);
- `refine`: the same over SSE (coarse, then final: every resolution);
- `stop_margin=M`: SSE with `parameters.stop_margin` M (the workers stop where they are confident,
  the gateway asks again for float32 where the ensemble is not), compared with `refine`;
- `stop_margin=M json`: the same as a plain JSON call, compared with `one-shot` (a stream always sends
  the coded replica's call at once, a JSON call holds it back: issue 27; the same transport on both
  sides keeps that out of the comparison). Since issue 31 a worker stops only at a coarse resolution
  it measured cheaper than float32, and computes none it did not: on the default bundle both
  stop_margin arms should cost what their baselines cost.

Per arm: the workers' compute-thread CPU seconds (`coinserve_worker_compute_cpu_seconds_total`, thread
time of the forward steps) and their whole-process CPU seconds (/proc/PID/stat, HTTP included), per
request; the gateway's process CPU; the ensemble accuracy of the final answers on the test split; how
many finals were at a coarse resolution; the p50 of the terminal event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from app import launcher
from bench.loadgen import json_body, metric_sum, replica_kernels, send_one
from models.data import load_split
from models.machine import machine

TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def worker_compute_s(url: str) -> float:
    return metric_sum(url, "coinserve_worker_compute_cpu_seconds_total")


async def _send_all(url: str, bodies: list[bytes], sse: bool, concurrency: int) -> list[Any]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    results: list[Any] = [None] * len(bodies)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        t0 = time.perf_counter()
        queue = iter(range(len(bodies)))

        async def client() -> None:
            for i in queue:
                results[i] = await send_one(session, url, bodies[i], sse, t0)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def _ensemble_label(body: dict[str, Any] | None) -> int:
    if not body:
        return -1
    output = next(o for o in body["outputs"] if o["name"] == "ensemble")
    return int(np.argmax(output["data"]))


def run_arm(
    cluster: launcher.Cluster, url: str, images: np.ndarray, labels: np.ndarray, margin: float | None, sse: bool,
    concurrency: int, final_resolution: int,
) -> dict[str, Any]:  # fmt: skip
    workers = [c for c in cluster.children if c.name != "gateway"]
    gateway = next(c for c in cluster.children if c.name == "gateway")
    parameters = {} if margin is None else {"stop_margin": margin}
    bodies = [json_body(images[i : i + 1], parameters) for i in range(len(images))]
    before = {c.name: (worker_compute_s(c.url), process_cpu_s(c.process.pid)) for c in workers}
    gateway_before = process_cpu_s(gateway.process.pid)
    started = time.perf_counter()
    samples = asyncio.run(_send_all(url, bodies, sse, concurrency))
    seconds = time.perf_counter() - started
    time.sleep(0.2)  # let a step cut short by nobody finish before the counters are read
    after = {c.name: (worker_compute_s(c.url), process_cpu_s(c.process.pid)) for c in workers}
    n = len(samples)
    ok = [s for s in samples if s.outcome == "final"]
    predicted = np.array([_ensemble_label(s.body) if s.outcome == "final" else -1 for s in samples])
    resolution = [s.body["parameters"].get("resolution") for s in ok if s.body]
    return {
        "requests": n,
        "errors": n - len(ok),
        "seconds": round(seconds, 3),
        "compute_cpu_ms_per_request": round(sum(after[k][0] - before[k][0] for k in after) * 1000 / n, 4),
        "worker_process_cpu_ms_per_request": round(sum(after[k][1] - before[k][1] for k in after) * 1000 / n, 4),
        "gateway_cpu_ms_per_request": round((process_cpu_s(gateway.process.pid) - gateway_before) * 1000 / n, 4),
        "per_replica_compute_ms": {k: round((after[k][0] - before[k][0]) * 1000 / n, 4) for k in after},
        "accuracy": round(float((predicted == labels).mean()), 5),
        "finals_at_coarse": sum(1 for r in resolution if r < final_resolution),
        "p50_ms": round(statistics.median(s.final_ms for s in ok), 3) if ok else None,
    }


def measure(
    bundle: Path, count: int, rounds: int, concurrency: int, margin: float, settle_s: float = 10.0
) -> dict[str, Any]:
    test = load_split("test")
    images, labels = test.images[:count], test.labels[:count]
    arms = {
        "one-shot": (None, False),
        "refine": (None, True),
        f"stop_margin={margin:g}": (margin, True),
        f"stop_margin={margin:g} json": (margin, False),
    }
    port = launcher.free_port()
    cluster = launcher.start(bundle, port)
    rows: list[dict[str, Any]] = []
    try:
        launcher.wait_ready(cluster, timeout_s=180)
        manifest = json.loads((bundle / "manifest.json").read_text())
        url = f"http://127.0.0.1:{port}/v2/models/{manifest['name']}/infer"
        final = len(manifest["refinement"]["planes"])
        time.sleep(settle_s)  # the workers re-time their resolutions while idle (issue 31): live ones settle
        replicas = replica_kernels(cluster)
        run_arm(cluster, url, images[:200], labels[:200], None, True, concurrency, final)  # warm-up, not reported
        names = list(arms)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                margin_, sse = arms[name]
                row = {
                    "arm": name,
                    "round": r,
                    **run_arm(cluster, url, images, labels, margin_, sse, concurrency, final),
                }
                rows.append(row)
                print(
                    f"round {r} {name}: compute {row['compute_cpu_ms_per_request']} ms/request, worker processes "
                    f"{row['worker_process_cpu_ms_per_request']} ms/request, accuracy {row['accuracy']}, "
                    f"{row['finals_at_coarse']} finals at a coarse resolution, {row['errors']} errors",
                    flush=True,
                )
    finally:
        cluster.stop()
    summary = {}
    for name in arms:
        mine = [r for r in rows if r["arm"] == name]
        summary[name] = {
            key: round(statistics.mean(r[key] for r in mine), 4)
            for key in (
                "compute_cpu_ms_per_request",
                "worker_process_cpu_ms_per_request",
                "gateway_cpu_ms_per_request",
                "accuracy",
                "finals_at_coarse",
                "errors",
            )  # fmt: skip
        }
    for base, arm in (("refine", f"stop_margin={margin:g}"), ("one-shot", f"stop_margin={margin:g} json")):
        stop = summary[arm]
        summary[f"vs_{base}"] = {
            "compute_cpu_saved": round(
                1 - stop["compute_cpu_ms_per_request"] / summary[base]["compute_cpu_ms_per_request"], 4
            ),
            "worker_process_cpu_saved": round(
                1 - stop["worker_process_cpu_ms_per_request"] / summary[base]["worker_process_cpu_ms_per_request"], 4
            ),
            "accuracy_points": round((stop["accuracy"] - summary[base]["accuracy"]) * 100, 3),
        }  # fmt: skip
    return {
        "machine": machine(),
        "bundle": str(bundle),
        "replicas": replicas,
        "images": count,
        "rounds": rounds,
        "concurrency": concurrency,
        "margin": margin,
        "rows": rows,
        "summary": summary,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path(os.environ.get("COINSERVE_BUNDLE", "bundles/default")))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--images", type=int, default=10000, help="test images per arm and round (default: all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="200 images, one round: a smoke test")
    args = parser.parse_args(argv)
    count, rounds = (200, 1) if args.quick else (args.images, args.rounds)
    report = measure(args.bundle, count, rounds, args.concurrency, args.margin, 2.0 if args.quick else 10.0)
    print(json.dumps(report["summary"], indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
