"""Soak test (issue 8): hours of life compressed into minutes. The whole service runs at a fraction
of its measured capacity with real stragglers (SIGSTOP/SIGCONT) on every replica but one, and that
one (the victim) is killed with SIGKILL and restarted on its port, again and again.

    python -m bench.soak [--duration-s 600] [--load 0.7] [--json PATH] [--out docs/results]
                                                                      (or: coinserve bench soak)

Every request is one of three kinds, in turn: a plain JSON call, a JSON call with a deadline, and a
server-sent-event stream with a deadline. Each must end in exactly one final answer or one error:
`lost` = sent − finals − errors (a reset connection, a stream that ends without its final event, a
client time-out) must be 0. Resident memory (VmRSS) of every process is sampled throughout; growth
is the median of the last window against the median of the first (windows: a minute, or a third of
the run if shorter). The victim's incarnations are new processes each time, so they are listed but
not judged on growth.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from app import launcher
from bench.loadgen import Sample, json_body, percentiles, send_one
from bench.tail import Straggler, schedule
from models.data import load_split
from models.machine import machine

KINDS = ("json", "json+deadline", "sse+deadline")
DEADLINE_MS = 1000.0


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Incarnation:
    name: str
    pid: int
    started_s: float
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, RSS KiB)


class Chaos(threading.Thread):
    """Kills the victim with SIGKILL every `every_s` seconds and restarts it on its port `down_s`
    later; samples every process's resident memory every `sample_s` seconds."""

    def __init__(
        self, cluster: launcher.Cluster, victim: str, bundle: Path, every_s: float, down_s: float, sample_s: float
    ) -> None:
        super().__init__(daemon=True)
        self.cluster, self.victim, self.bundle = cluster, victim, bundle
        self.every_s, self.down_s, self.sample_s = every_s, down_s, sample_s
        self.stop_flag = threading.Event()
        self.t0 = time.perf_counter()
        self.kills = 0
        self.kill_times: list[float] = []
        self.incarnations = {c.name: [Incarnation(c.name, c.process.pid, 0.0)] for c in cluster.children}

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def run(self) -> None:
        next_kill = self.every_s if self.every_s > 0 else float("inf")
        while not self.stop_flag.wait(self.sample_s):
            self.sample()
            if self.now() >= next_kill:
                self.kill_and_restart()
                next_kill = self.now() + self.every_s

    def sample(self) -> None:
        t = self.now()
        for child in self.cluster.children:
            kib = rss_kib(child.process.pid)
            if kib is not None and child.process.poll() is None:
                self.incarnations[child.name][-1].samples.append((t, kib))

    def kill_and_restart(self) -> None:
        index = next(i for i, c in enumerate(self.cluster.children) if c.name == self.victim)
        old = self.cluster.children[index]
        old.process.send_signal(signal.SIGKILL)
        old.process.wait()
        self.kills += 1
        self.kill_times.append(self.now())
        time.sleep(self.down_s)  # restarted even when the soak is ending: every process alive at the end
        new = launcher.respawn(old)  # the same command line: its ports, its channel
        self.cluster.children[index] = new
        self.incarnations[self.victim].append(Incarnation(self.victim, new.process.pid, self.now()))

    def finish(self) -> None:
        self.stop_flag.set()
        self.join()
        self.sample()


async def _load(
    url: str, bodies: dict[str, list[bytes]], rate: float, seconds: float, seed: int, progress: Any
) -> list[tuple[str, Sample]]:
    """Open-loop Poisson arrivals for `seconds`; the request kinds take turns."""
    rng = np.random.default_rng(seed)
    results: list[tuple[str, Sample]] = []

    async def one(kind: str, body: bytes) -> None:
        results.append((kind, await send_one(session, url, body, kind.startswith("sse"), t0)))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        t0 = time.perf_counter()
        due = t0
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        shown = 0
        while due - t0 < seconds:
            due += rng.exponential(1 / rate)
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            kind = KINDS[i % len(KINDS)]
            task = asyncio.create_task(one(kind, bodies[kind][i % len(bodies[kind])]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            elapsed = int(time.perf_counter() - t0)
            if elapsed > shown:
                progress.update(elapsed - shown)
                shown = elapsed
                # Out of the collector's way, once a second, what has been kept so far: a full
                # collection over minutes of answers stalled this loop (and showed as lateness).
                gc.freeze()
        if tasks:
            await asyncio.wait(tasks)
    return results


async def _capacity(url: str, bodies: dict[str, list[bytes]], seconds: float, concurrency: int = 32) -> float:
    """Closed-loop throughput of the same request mix (streams cost more than plain calls)."""
    done = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        t0 = time.perf_counter()

        async def client(offset: int) -> None:
            nonlocal done
            i = offset
            while time.perf_counter() - t0 < seconds:
                kind = KINDS[i % len(KINDS)]
                sample = await send_one(session, url, bodies[kind][i % len(bodies[kind])], kind.startswith("sse"), t0)
                done += sample.outcome == "final"
                i += 1

        await asyncio.gather(*(client(c) for c in range(concurrency)))
        return done / (time.perf_counter() - t0)


def probe_capacity(bundle: Path, bodies: dict[str, list[bytes]]) -> float:
    """The request mix's capacity, closed loop at concurrency 32, on a cluster of its own with load
    shedding off (a refused request would come straight back: the probe would measure its own
    refusal storm, not what the replicas can do)."""
    cluster = launcher.start(bundle, launcher.free_port(), env={"COINSERVE_OVERLOAD_LAG_MS": "1e9"})
    try:
        launcher.wait_ready(cluster)
        url = f"{cluster.children[-1].url}/v2/models/fashion/infer"
        asyncio.run(_capacity(url, bodies, 2.0, concurrency=8))  # warm-up
        return asyncio.run(_capacity(url, bodies, 8.0))
    finally:
        cluster.stop()


def request_bodies(n: int) -> tuple[dict[str, list[bytes]], np.ndarray]:
    test = load_split("test")
    bodies: dict[str, list[bytes]] = {kind: [] for kind in KINDS}
    for i in range(n):
        image = test.images[i : i + 1]
        bodies["json"].append(json_body(image))
        bodies["json+deadline"].append(json_body(image, {"deadline_ms": DEADLINE_MS}))
        bodies["sse+deadline"].append(json_body(image, {"deadline_ms": DEADLINE_MS}))
    return bodies, test.labels[:n]


def growth(samples: list[tuple[float, int]], window_s: float) -> dict[str, Any]:
    """Median RSS of the first and the last window of a process's life, and the growth between."""
    if not samples:
        return {"first_kib": None, "last_kib": None, "growth": None}
    start, end = samples[0][0], samples[-1][0]
    first = [kib for t, kib in samples if t <= start + window_s]
    last = [kib for t, kib in samples if t >= end - window_s]
    a, b = float(np.median(first)), float(np.median(last))
    return {"first_kib": int(a), "last_kib": int(b), "growth": round(b / a - 1, 4)}


def soak(
    bundle: Path,
    seconds: float,
    load: float = 0.7,
    rate: float | None = None,
    victim: str | None = None,
    kill_every_s: float = 30.0,
    down_s: float = 3.0,
    intensity: str = "medium",
    sample_s: float = 2.0,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, Any]:
    from tqdm import tqdm

    manifest = json.loads((bundle / "manifest.json").read_text())
    members = [m["name"] for m in manifest["members"]]
    victim = victim or members[-1]
    bodies, _ = request_bodies(256)
    capacity = None
    if rate is None:
        capacity = probe_capacity(bundle, bodies)
        rate = load * capacity
    cluster = launcher.start(bundle, launcher.free_port())
    try:
        launcher.wait_ready(cluster)
        gateway = next(c for c in cluster.children if c.name == "gateway")
        url = f"{gateway.url}/v2/models/fashion/infer"
        asyncio.run(_capacity(url, bodies, 2.0, concurrency=8))  # warm-up
        replicas = [c for c in cluster.children if c.name not in ("gateway", victim)]
        pauses = schedule(seconds, len(replicas), intensity, seed)
        straggler = Straggler(pauses, [c.process.pid for c in replicas])
        chaos = Chaos(cluster, victim, bundle, kill_every_s, down_s, sample_s)
        with tqdm(total=int(seconds), unit="s", desc=f"soak at {rate:.0f} req/s", disable=quiet) as progress:
            chaos.start()
            straggler.start()
            try:
                results = asyncio.run(_load(url, bodies, rate, seconds, seed, progress))
            finally:
                straggler.finish()
                chaos.finish()
        alive = {c.name: c.process.poll() is None for c in cluster.children}
    finally:
        cluster.stop()
    return summarise(results, chaos, alive, victim, rate, capacity, seconds, len(pauses), intensity)


DEADLINE_KINDS = ("json+deadline", "sse+deadline")


def lateness(samples: list[Sample]) -> dict[str, Any]:
    """How far past its deadline each admitted deadline request ended, by the load generator's clock
    (refused requests, 429/503, are counted apart: they were answered at once)."""
    admitted = [s for s in samples if s.status not in (429, 503)]
    late = [s.final_ms - DEADLINE_MS for s in admitted]
    p50, p99, p999 = percentiles(late)
    return {
        "admitted": len(admitted),
        "refused": len(samples) - len(admitted),
        "p50": round(p50, 1),
        "p99": round(p99, 1),
        "p999": round(p999, 1),
        "max": round(max(late, default=float("nan")), 1),
        "over_50ms": sum(1 for v in late if v > 50),
    }


def summarise(
    results: list[tuple[str, Sample]],
    chaos: Chaos,
    alive: dict[str, bool],
    victim: str,
    rate: float,
    capacity: float | None,
    seconds: float,
    pauses: int,
    intensity: str,
) -> dict[str, Any]:
    outcomes = Counter(s.outcome for _, s in results)
    finals = outcomes["final"]
    errors = sum(n for o, n in outcomes.items() if o == "error" or o.startswith("http_"))
    finals_ms = [s.final_ms for _, s in results if s.outcome == "final"]
    window = min(60.0, seconds / 3)
    processes = []
    for name, lives in chaos.incarnations.items():
        for life in lives:
            processes.append(
                {
                    "process": name,
                    "pid": life.pid,
                    "started_s": round(life.started_s, 1),
                    "restarted": name == victim and life.started_s > 0,
                    "judged": name != victim,
                    **growth(life.samples, window),
                }
            )
    judged = [p["growth"] for p in processes if p["judged"] and p["growth"] is not None]
    p50, p99, p999 = percentiles(finals_ms)
    return {
        "seconds": round(seconds, 1),
        "rate_per_s": round(rate, 1),
        "capacity_req_per_s": round(capacity, 1) if capacity else None,
        "straggler_intensity": intensity,
        "pauses": pauses,
        "kills": chaos.kills,
        "victim": victim,
        "sent": len(results),
        "finals": finals,
        "errors": errors,
        "lost": len(results) - finals - errors,
        "outcomes": dict(outcomes),
        "by_kind": {
            kind: dict(Counter(s.outcome for k, s in results if k == kind)) for kind in sorted({k for k, _ in results})
        },
        "final_ms_by_kind": {
            kind: dict(
                zip(
                    ("p50", "p99", "p999"),
                    (round(v, 1) for v in percentiles([s.final_ms for k, s in results if k == kind])),
                    strict=True,
                )
            )
            for kind in sorted({k for k, _ in results})
        },
        "late_ms_by_kind": {kind: lateness([s for k, s in results if k == kind]) for kind in DEADLINE_KINDS},
        "refused": sum(1 for _, s in results if s.status in (429, 503) or s.outcome in ("http_429", "http_503")),
        "kill_times_s": [round(t, 1) for t in chaos.kill_times],
        "latency_series": [(round(s.sent_at, 3), round(s.final_ms, 1), kind) for kind, s in results],
        "approximate_finals": sum(
            1 for _, s in results if s.outcome == "final" and (s.body or {}).get("parameters", {}).get("approximate")
        ),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "p999_ms": round(p999, 2),
        "rss_window_s": window,
        "max_growth": max(judged) if judged else None,
        "all_alive_at_end": all(alive.values()),
        "processes": processes,
        "rss_series": {
            f"{life.name}#{i}": life.samples
            for name, lives in chaos.incarnations.items()
            for i, life in enumerate(lives)
        },
    }


def write_report(result: dict[str, Any], settings: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.evaluate import markdown_table

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, series in sorted(result["rss_series"].items()):
        if series:
            t, kib = zip(*series, strict=True)
            ax.plot(t, np.array(kib) / 1024, label=label, linewidth=1)
    ax.set_xlabel("seconds into the soak")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title(f"Resident memory during the soak ({result['kills']} kills of {result['victim']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.savefig(out / "soak_rss.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind in KINDS:
        points = [(t, ms) for t, ms, k in result["latency_series"] if k == kind]
        if points:
            t, ms = zip(*points, strict=True)
            ax.scatter(t, ms, s=1, alpha=0.4, label=kind)
    for i, t in enumerate(result["kill_times_s"]):
        ax.axvline(t, color="red", alpha=0.3, linewidth=0.8, label="SIGKILL of the victim" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("seconds into the soak (request sent)")
    ax.set_ylabel("time to the terminal event (ms, log scale)")
    ax.set_title("Every request of the soak")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, markerscale=8)
    fig.savefig(out / "soak_latency.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    m = settings["machine"]
    counts = ("sent", "finals", "errors", "lost", "approximate_finals", "kills", "pauses", "p50_ms", "p99_ms")
    lines = [
        "# Soak: sustained load with stragglers and a replica killed again and again",
        "",
        "Regenerate: `coinserve bench soak` (10 minutes); the CI variant runs half a minute "
        "(`tests/integration/test_soak.py`).",
        "",
        f"Machine: {m.get('cpu', '?')} ({', '.join(m.get('cpu_flags', []))}), {m['cpus']} CPUs, {m['platform']}, "
        f"Python {m['python']}, run {m['date']}. "
        f"{result['seconds']:g} s at {result['rate_per_s']:g} req/s "
        f"(load {settings['load']:g} of a measured capacity of {result['capacity_req_per_s']} req/s); request kinds "
        f"in turn: {', '.join(KINDS)} (deadline {DEADLINE_MS:g} ms). Stragglers: SIGSTOP/SIGCONT of every replica "
        f"but `{result['victim']}`, intensity {result['straggler_intensity']}; `{result['victim']}` is killed with "
        f"SIGKILL every {settings['kill_every_s']:g} s and restarted {settings['down_s']:g} s later.",
        "",
        markdown_table([{k: result[k] for k in counts}], counts),
        "",
        f"Outcomes: `{json.dumps(result['outcomes'])}`; by request kind: `{json.dumps(result['by_kind'])}`; "
        f"time to the terminal event by kind (ms): `{json.dumps(result['final_ms_by_kind'])}`.",
        "",
        "Client-side lateness of the deadline requests (ms past the deadline, by the load generator's clock, "
        "from the moment each request was sent; requests refused at admission with 429/503 are counted apart):",
        "",
        markdown_table(
            [{"kind": kind, **v} for kind, v in result["late_ms_by_kind"].items()],
            ("kind", "admitted", "refused", "p50", "p99", "p999", "max", "over_50ms"),
        ),
        "",
        f"Approximate finals: {result['approximate_finals']} of {result['finals']} "
        f"({100 * result['approximate_finals'] / max(result['finals'], 1):.1f}%); lost: {result['lost']}.",
        "",
        "![soak_latency.png](soak_latency.png)",
        "",
        f"Resident memory: median of the first {result['rss_window_s']:g} s of each process's life against the "
        f"median of its last {result['rss_window_s']:g} s. The victim's incarnations are fresh processes "
        "(listed, not judged).",
        "",
        markdown_table(
            result["processes"], ("process", "pid", "started_s", "judged", "first_kib", "last_kib", "growth")
        ),
        "",
        f"Largest growth of a judged process: {result['max_growth']}; every process alive at the end: "
        f"{result['all_alive_at_end']}.",
        "",
        "![soak_rss.png](soak_rss.png)",
        "",
    ]
    (out / "soak.md").write_text("\n".join(lines))


# the opening of `coinserve bench soak --help`: one full sentence
DESCRIPTION = (
    "Soak the whole service for minutes at a fraction of its capacity, with stragglers on every replica "
    "but one and that one killed and restarted again and again (issue 8)."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--bundle", type=Path, default=Path(os.environ.get("COINSERVE_BUNDLE", "bundles/default")))
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity")
    parser.add_argument("--rate", type=float, default=None, help="requests per second (skips the capacity probe)")
    parser.add_argument("--victim", default=None, help="the replica killed and restarted (default: the last member)")
    parser.add_argument("--kill-every-s", type=float, default=30.0)
    parser.add_argument("--down-s", type=float, default=3.0, help="how long the victim stays dead")
    parser.add_argument("--intensity", default="medium", help="straggler intensity: none, low, medium, high")
    parser.add_argument("--json", type=Path, default=Path("docs/results/soak.json"))
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for soak.md and its plot")
    args = parser.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        sys.exit(f"no bundle at {args.bundle}: run `coinserve train` and `coinserve code` first (or ./dev.sh up)")
    result = soak(
        args.bundle,
        args.duration_s,
        load=args.load,
        rate=args.rate,
        victim=args.victim,
        kill_every_s=args.kill_every_s,
        down_s=args.down_s,
        intensity=args.intensity,
    )
    settings = {
        "machine": machine(),
        "load": args.load,
        "kill_every_s": args.kill_every_s,
        "down_s": args.down_s,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k not in ("rss_series", "latency_series")}
    args.json.write_text(orjson.dumps({"settings": settings, "result": summary}, option=orjson.OPT_INDENT_2).decode())
    write_report(result, settings, args.out)
    shown = {k: summary[k] for k in ("sent", "finals", "errors", "lost", "p99_ms", "max_growth", "all_alive_at_end")}
    print(json.dumps(shown))
    print(f"wrote {args.json} and {args.out / 'soak.md'}")
    if summary["lost"] or not summary["all_alive_at_end"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
