"""Tail-latency benchmark (issue 6): coded serving against waiting for everyone and against hedging,
each with the same k + 1 replica processes, under real stragglers (SIGSTOP/SIGCONT).

    python -m bench.tail [--quick] [--json PATH] [--out docs/results]      (or: coinserve bench tail)

Modes: wait-all (k members; the extra process idles), hedge (the extra process hosts every member;
a call still missing after the member's p95 latency is re-sent there), coded (the extra process is
the COIN coded replica; decode as soon as k of k + 1 are in), coded+refine (as coded, streaming:
the first complete answer is the coarse event). Open-loop Poisson arrivals at fractions of the
measured capacity; one seeded straggler schedule per (load, intensity, trial), shared by every mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app import launcher
from bench.loadgen import Run, closed_loop, json_body, open_loop, percentiles
from bench.serving import machine
from models.data import load_split

MODES = ("wait-all", "hedge", "coded", "coded+refine")
INTENSITIES = {  # pauses per replica per second, Pareto scale (ms), Pareto alpha, cap (ms)
    "none": (0.0, 50.0, 1.5, 2000.0),
    "low": (0.05, 50.0, 1.5, 2000.0),
    "medium": (0.1, 50.0, 1.5, 2000.0),
    "high": (0.25, 50.0, 1.5, 2000.0),
}


@dataclass(frozen=True)
class Pause:
    at_s: float
    slot: int  # 0..k-1: member i; k: the extra process
    duration_s: float


def schedule(seconds: float, slots: int, intensity: str, seed: int) -> list[Pause]:
    """Heavy-tailed pauses, Poisson in time per replica slot; the same for every mode."""
    rate, scale_ms, alpha, cap_ms = INTENSITIES[intensity]
    rng = np.random.default_rng(seed)
    pauses: list[Pause] = []
    if rate == 0:
        return pauses
    for slot in range(slots):
        t = rng.exponential(1 / rate)
        while t < seconds:
            duration = min(cap_ms, scale_ms * (1 + rng.pareto(alpha))) / 1000
            pauses.append(Pause(t, slot, duration))
            t += duration + rng.exponential(1 / rate)
    return sorted(pauses, key=lambda p: p.at_s)


class Straggler(threading.Thread):
    """Applies a schedule with real signals; always leaves every process running when it ends."""

    def __init__(self, pauses: list[Pause], pids: list[int]) -> None:
        super().__init__(daemon=True)
        events = [(p.at_s, pids[p.slot], signal.SIGSTOP) for p in pauses]
        events += [(p.at_s + p.duration_s, pids[p.slot], signal.SIGCONT) for p in pauses]
        self.events = sorted(events, key=lambda e: e[0])
        self.pids = pids
        self.stop_flag = threading.Event()

    def run(self) -> None:
        start = time.perf_counter()
        try:
            for at, pid, sig in self.events:
                if self.stop_flag.wait(max(0.0, at - (time.perf_counter() - start))):
                    return
                os.kill(pid, sig)
        finally:
            for pid in self.pids:
                os.kill(pid, signal.SIGCONT)

    def finish(self) -> None:
        self.stop_flag.set()
        self.join()


def start_mode(mode: str, bundle: Path, k: int) -> tuple[launcher.Cluster, str, list[int]]:
    """The mode's k + 1 replica processes and its gateway; returns (cluster, infer URL, slot pids)."""
    members = [f"member-{i}" for i in range(k)]
    extra_models = {"wait-all": "coded-coin-0", "hedge": ",".join(members)}.get(mode, "coded-coin-0")
    cluster = launcher.Cluster()
    env = dict(os.environ)
    try:
        for name in [*members, extra_models]:
            port = launcher.free_port()
            args = ["worker", "--bundle", str(bundle), "--model", name, "--port", str(port)]
            cluster.children.append(launcher.spawn(name, port, args, env))
        port = launcher.free_port()
        gateway = ["gateway", "--bundle", str(bundle), "--port", str(port)]
        gateway += [arg for c in cluster.children[:k] for arg in ("--replica", f"{c.name}={c.url}")]
        extra = cluster.children[k]
        if mode == "wait-all":
            gateway += ["--coded-method", "none"]
        elif mode == "hedge":
            gateway += ["--coded-method", "none", "--hedge-replica", extra.url]
        else:
            gateway += ["--replica", f"{extra.name}={extra.url}"]
        cluster.children.append(launcher.spawn("gateway", port, gateway, env))
        launcher.wait_ready(cluster)
    except BaseException:
        cluster.stop()
        raise
    return (
        cluster,
        f"http://127.0.0.1:{port}/v2/models/fashion/infer",
        [c.process.pid for c in cluster.children[: k + 1]],
    )


def served(run: Run, labels: np.ndarray) -> dict[str, Any]:
    finals = [s for s in run.samples if s.outcome == "final" and s.body]
    correct = decoded = approximate = 0
    for s in finals:
        assert s.body is not None
        outputs = {o["name"]: o["data"] for o in s.body["outputs"]}
        index = int(s.body["id"])
        correct += int(np.argmax(outputs["ensemble"]) == labels[index % len(labels)])
        params = s.body["parameters"]
        decoded += bool(params["decoded_members"])
        approximate += bool(params["approximate"])
    n = max(1, len(finals))
    return {"served_accuracy": correct / n, "decoded_fraction": decoded / n, "approximate_fraction": approximate / n}


def row(
    mode: str, load: float, rate: float, intensity: str, trial: int, run: Run, labels: np.ndarray
) -> dict[str, Any]:
    ok = run.ok()
    first = [s.first_ms for s in ok]
    final = [s.final_ms for s in ok]
    p = percentiles(first)
    f = percentiles(final)
    return {
        "mode": mode,
        "load": load,
        "rate_per_s": round(rate, 1),
        "intensity": intensity,
        "trial": trial,
        "requests": len(run.samples),
        "errors": len(run.samples) - len(ok),
        "p50_ms": round(p[0], 2),
        "p99_ms": round(p[1], 2),
        "p999_ms": round(p[2], 2),
        "final_p50_ms": round(f[0], 2),
        "final_p99_ms": round(f[1], 2),
        "final_p999_ms": round(f[2], 2),
        **{k: round(v, 4) for k, v in served(run, labels).items()},
        "first_ms": [round(x, 2) for x in first],
        "final_ms": [round(x, 2) for x in final],
    }


def request_bodies(n: int, stream: bool) -> tuple[list[bytes], np.ndarray]:
    test = load_split("test")
    bodies = []
    for i in range(n):
        body = json.loads(json_body(test.images[i : i + 1]))
        body["id"] = str(i)
        bodies.append(json.dumps(body).encode())
    return bodies, test.labels[:n]


def measure_capacity(bundle: Path, k: int, seconds: float) -> float:
    cluster, url, _ = start_mode("coded", bundle, k)
    try:
        bodies, _ = request_bodies(256, False)
        asyncio.run(closed_loop(url, bodies, 32, 2.0))
        run = asyncio.run(closed_loop(url, bodies, 32, seconds))
        return len(run.samples) / run.seconds
    finally:
        cluster.stop()


def sweep(args: argparse.Namespace, capacity: float, points: list[tuple[float, str]]) -> list[dict[str, Any]]:
    k = len(json.loads((args.bundle / "manifest.json").read_text())["members"])
    bodies, labels = request_bodies(2000, False)
    rows: list[dict[str, Any]] = []
    clusters = {"wait-all": "wait-all", "hedge": "hedge", "coded": "coded", "coded+refine": "coded"}
    wanted = args.modes.split(",")
    for cluster_mode in [m for m in ("wait-all", "hedge", "coded") if any(clusters[w] == m for w in wanted)]:
        cluster, url, pids = start_mode(cluster_mode, args.bundle, k)
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.cpu_hog else None
        try:
            asyncio.run(closed_loop(url, bodies, 8, 2.0))  # warm-up, discarded
            for mode in [m for m in MODES if clusters[m] == cluster_mode and m in wanted]:
                for load, intensity in points:
                    rate = load * capacity
                    for trial in range(args.trials):
                        seed = int(load * 1000) * 100 + list(INTENSITIES).index(intensity) * 10 + trial
                        seconds = args.requests / rate
                        pauses = schedule(seconds + 1.0, k + 1, intensity, seed)
                        straggler = Straggler(pauses, pids)
                        straggler.start()
                        try:
                            run = asyncio.run(
                                open_loop(url, bodies, rate, args.requests, sse=mode == "coded+refine", seed=seed)
                            )
                        finally:
                            straggler.finish()
                        result = row(mode, load, rate, intensity, trial, run, labels)
                        rows.append(result)
                        shown = {
                            k2: v
                            for k2, v in result.items()
                            if not k2.endswith("_ms") or k2.startswith(("p", "final_p"))
                        }
                        shown = {k2: v for k2, v in shown.items() if k2 not in ("first_ms", "final_ms")}
                        print(json.dumps(shown), flush=True)
                        time.sleep(0.5)  # resumed replicas drain what they held
        finally:
            if hog is not None:
                hog.kill()
            cluster.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path(os.environ.get("COINSERVE_BUNDLE", "bundles/default")))
    parser.add_argument("--json", type=Path, default=Path("docs/results/tail.json"))
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for tail.md and the plots")
    parser.add_argument(
        "--quick", action="store_true", help="one load, one trial, 300 requests: a smoke test (< 2 min)"
    )
    parser.add_argument("--cpu-hog", action="store_true", help="also run a busy-looping process during every trial")
    parser.add_argument(
        "--points", default=None, help="override the sweep: LOAD:INTENSITY,... e.g. 0.4:none,0.4:medium"
    )
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    args = parser.parse_args()
    args.trials, args.requests = (1, 300) if args.quick else (3, 600)
    # Loads beyond ~40% of the closed-loop capacity overload every mode on 2 cores shared by seven
    # processes (measured: docs/results/tail.md), so the default sweep stays below; 10% was dropped
    # to keep the sweep under 15 minutes (it alone took 4.5 of them).
    loads = [0.2] if args.quick else [0.2, 0.3, 0.4]
    points = [(load, "medium") for load in loads]
    if not args.quick:
        points += [(0.2, "low"), (0.2, "high")]
    if args.points:
        points = [(float(p.split(":")[0]), p.split(":")[1]) for p in args.points.split(",")]
    started = time.perf_counter()
    k = len(json.loads((args.bundle / "manifest.json").read_text())["members"])
    capacity = measure_capacity(args.bundle, k, 3.0 if args.quick else 8.0)
    print(f"capacity (coded, closed loop, concurrency 32): {capacity:.0f} req/s", flush=True)
    rows = sweep(args, capacity, points)
    settings = {
        "machine": machine(),
        "capacity_req_per_s": round(capacity, 1),
        "k": k,
        "points": points,
        "trials": args.trials,
        "requests_per_trial": args.requests,
        "intensities": INTENSITIES,
        "cpu_hog": args.cpu_hog,
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "settings": settings,
                "rows": [{k2: v for k2, v in r.items() if k2 not in ("first_ms", "final_ms")} for r in rows],
            },
            indent=1,
        )
        + "\n"
    )
    from bench.tail_report import write_report

    write_report(rows, settings, args.out)
    print(f"wrote {args.json} and {args.out / 'tail.md'} in {settings['seconds']} s")


if __name__ == "__main__":
    main()
