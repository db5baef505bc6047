"""How much the coded replica computes when nothing straggles (issue 27: redundancy that costs
nothing when it is not needed): open-loop JSON requests at fractions of the cluster's capacity,
and, per request, the rows each replica computed and the calls it received.

    python -m bench.coded_rows [--loads 0.2,0.4,0.8] [--requests 3000] [--json docs/results/coded_rows.json]

The cluster is the tail benchmark's (k member processes and one hosting the coded replica), the
gateway's decoding policy the default (patient). The capacity is measured first (closed loop,
concurrency 32). A member is paused nowhere: every coded row computed here is insurance paid for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from bench import tail
from bench.loadgen import closed_loop, metric_sum, open_loop
from bench.peers.servers import member_names
from models.machine import machine


def counters(workers: Any) -> dict[str, dict[str, float]]:
    return {
        c.name: {
            "rows": metric_sum(c.url, "coinserve_worker_rows_computed_total"),
            "calls": metric_sum(c.url, "coinserve_worker_requests_total"),
        }
        for c in workers.children
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument("--loads", default="0.2,0.4,0.8")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    bodies = tail.request_bodies(tail.images_of("test").images[:2000])
    k = len(member_names(args.bundle))
    workers = tail.start_workers(args.bundle, k)
    report: dict[str, Any] = {"machine": machine(), "requests_per_load": args.requests, "loads": []}
    try:
        gateway = tail.start_gateway(workers, tail.Spec("coded", 0.0, "none", 0.999), args.bundle, k, 5.0)
        try:
            url = tail.infer_url(gateway)
            asyncio.run(closed_loop(url, bodies, 32, 2.0))
            run = asyncio.run(closed_loop(url, bodies, 32, 8.0))
            capacity = len(run.ok()) / run.seconds
            report["capacity_per_s"] = round(capacity, 1)
            print(f"capacity {capacity:.0f} req/s", flush=True)
            for load in (float(x) for x in args.loads.split(",")):
                before = counters(workers)
                done = asyncio.run(open_loop(url, bodies, load * capacity, args.requests, seed=3))
                after = counters(workers)
                answered = len(done.ok())
                per = {
                    name: {
                        key: round((after[name][key] - before[name][key]) / answered, 4) for key in ("rows", "calls")
                    }
                    for name in after
                }
                coded = workers.children[k].name
                row = {
                    "load": load,
                    "rate_per_s": round(load * capacity, 1),
                    "answered": answered,
                    "errors": len(done.samples) - answered,
                    "coded_rows_per_request": per[coded]["rows"],
                    "coded_calls_per_request": per[coded]["calls"],
                    "member_rows_per_request": [per[c.name]["rows"] for c in workers.children[:k]],
                }
                report["loads"].append(row)
                print(json.dumps(row), flush=True)
        finally:
            gateway.stop()
    finally:
        workers.stop()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
