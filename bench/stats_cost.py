"""What Triton's statistics extension costs the hot path (issue 28): the closed loop of
bench/request_cpu.py (concurrency 32, the tail benchmark's cluster) in alternating rounds, without
and with a reader asking `GET /v2/models/{m}/stats` every second, and the median over rounds of the
ratio of their throughputs (each round runs the two back to back).

    python -m bench.stats_cost [--rounds 5] [--seconds 10] [--json docs/results/stats_cost.json]

The counters are updated once per request when it ends (app/statistics.py) whether or not anyone
reads them, so the reader measures the cost of the reads; the cost of keeping them is inside every
round (compare bench/request_cpu.py's CPU per request across versions for that). Rounds alternate so
that a drift of the host (thermal, a neighbour) falls on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
from pathlib import Path
from typing import Any

import httpx

from bench import tail
from bench.loadgen import closed_loop
from bench.request_cpu import coded_cluster
from models.machine import machine


class Reader:
    """A separate process asking for the statistics every `every_s` while it runs, as a monitoring
    tool would (a thread in the load generator's own process would share its interpreter and lock
    with the sending loop, so the generator, not the gateway, would be measured); it reports the
    success count of every read."""

    def __init__(self, url: str, every_s: float = 1.0) -> None:
        self.url, self.every_s = url, every_s
        self.stop = multiprocessing.Event()
        self.counts: multiprocessing.Queue[list[int]] = multiprocessing.Queue()
        self.process = multiprocessing.Process(target=_read, args=(url, every_s, self.stop, self.counts), daemon=True)
        self.successes: list[int] = []

    @property
    def reads(self) -> int:
        return len(self.successes)

    def __enter__(self) -> Reader:
        self.process.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.successes = self.counts.get(timeout=30)
        self.process.join()


def _read(url: str, every_s: float, stop: Any, counts: Any) -> None:
    successes = []
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            (stats,) = client.get(url).raise_for_status().json()["model_stats"]
            successes.append(stats["inference_stats"]["success"]["count"])
            stop.wait(every_s)
    counts.put(successes)


def one_round(url: str, bodies: list[bytes], seconds: float, stats_url: str | None) -> dict[str, Any]:
    if stats_url is None:
        run = asyncio.run(closed_loop(url, bodies, 32, seconds))
        return {"reader": False, "answered_per_s": len(run.ok()) / run.seconds}
    with Reader(stats_url) as reader:
        run = asyncio.run(closed_loop(url, bodies, 32, seconds))
    moved = reader.successes[-1] - reader.successes[0] if reader.successes else 0
    return {"reader": True, "answered_per_s": len(run.ok()) / run.seconds, "reads": reader.reads, "moved": moved}


def measure(bundle: Path, rounds: int, seconds: float) -> dict[str, Any]:
    bodies = tail.request_bodies(tail.images_of("test").images[:2000])
    with coded_cluster(bundle) as (_, gateway):
        url = tail.infer_url(gateway)
        stats_url = url.removesuffix("/infer") + "/stats"
        asyncio.run(closed_loop(url, bodies, 32, min(2.0, seconds)))  # warm-up
        results = []
        for i in range(rounds):
            for with_reader in (i % 2 == 1, i % 2 == 0):  # alternate which goes first
                results.append(one_round(url, bodies, seconds, stats_url if with_reader else None))
    plain = [r["answered_per_s"] for r in results if not r["reader"]]
    read = [r["answered_per_s"] for r in results if r["reader"]]
    # Each round's two runs are next to each other in time: their ratio is what the host's drift
    # (±15% between minutes here) disturbs least; the median of those ratios is the figure.
    paired = [
        (b if b["reader"] else a)["answered_per_s"] / (a if b["reader"] else b)["answered_per_s"]
        for a, b in zip(results[::2], results[1::2], strict=True)
    ]
    return {
        "machine": machine(),
        "rounds": [{**r, "answered_per_s": round(r["answered_per_s"], 1)} for r in results],
        "median_answered_per_s": {"without_reader": statistics.median(plain), "with_reader": statistics.median(read)},
        "ratio_by_round": [round(r, 4) for r in paired],
        "ratio_with_to_without": round(statistics.median(paired), 4),
        "spread_without": round((max(plain) - min(plain)) / statistics.median(plain), 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report = measure(args.bundle, args.rounds, args.seconds)
    print(json.dumps(report, indent=1))
    ratio, by_round = report["ratio_with_to_without"], report["ratio_by_round"]
    print(f"throughput with the stats reader / without, by round: {by_round}; median {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
