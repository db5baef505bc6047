"""Where each server's CPU goes at saturation (issue 20: why coinserve loses where it loses): the
closed loop at concurrency 32 for a few seconds, and every process's CPU seconds per answered
request from /proc, grouped as front end (gateway, Triton's server, Ray's proxy/ingress/controller
and raylet) and model processes (the k + 1 that hold the models).

    python -m bench.peers.cpu [--bundle bundles/default] [--seconds 8] [--json docs/results/peers_cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from bench import tail
from bench.loadgen import closed_loop
from bench.peers.servers import member_names, session, start_ray, start_triton
from bench.stop_margin import process_cpu_s
from models.machine import machine


def _cpu(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            out[pid] = process_cpu_s(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def split(url: str, bodies: list[bytes], seconds: float, everyone: list[int], models: list[int]) -> dict[str, Any]:
    asyncio.run(closed_loop(url, bodies, 32, 1.0))
    before = _cpu(everyone)
    run = asyncio.run(closed_loop(url, bodies, 32, seconds))
    after = _cpu(everyone)
    answered = len(run.ok())
    used = {pid: after[pid] - before[pid] for pid in after if pid in before}
    model_s = sum(v for pid, v in used.items() if pid in models)
    front_s = sum(v for pid, v in used.items() if pid not in models)
    return {
        "answered_per_s": round(answered / run.seconds, 1),
        "model_processes_cpu_ms_per_request": round(model_s * 1000 / answered, 3),
        "front_end_cpu_ms_per_request": round(front_s * 1000 / answered, 3),
        "processes": len(used),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path(os.environ.get("COINSERVE_BUNDLE", "bundles/default")))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    k = len(member_names(args.bundle))
    bodies = tail.request_bodies(tail.images_of("test").images[:2000])
    report: dict[str, Any] = {"machine": machine(), "bundle": str(args.bundle)}
    workers = tail.start_workers(args.bundle, k)
    try:
        models = [c.process.pid for c in workers.children]
        for mode in ("coded", "wait-all"):
            spec = tail.Spec(mode, 0.0, "none", 0.999 if mode == "coded" else None)
            gateway = tail.start_gateway(workers, spec, args.bundle, k, 5.0)
            try:
                everyone = models + [gateway.children[0].process.pid]
                report[f"coinserve-{mode}"] = split(tail.infer_url(gateway), bodies, args.seconds, everyone, models)
                print(f"coinserve-{mode}", report[f"coinserve-{mode}"], flush=True)
            finally:
                gateway.stop()
    finally:
        workers.stop()
    for name, start in (("ray-serve", start_ray), ("triton", start_triton)):
        peer = start(args.bundle, bodies[0], "member-0")
        try:
            report[name] = split(peer.url, bodies, args.seconds, session(peer.process.pid), peer.pids)
            print(name, report[name], flush=True)
        finally:
            peer.stop()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
