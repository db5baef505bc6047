"""Where each server's CPU goes at saturation (issues 20 and 27): the closed loop at concurrency 32
for a few seconds, and every process's CPU seconds per answered request from /proc, grouped as
front end (gateway, Triton's server, Ray's proxy/ingress/controller and raylet) and model
processes (the k + 1 that hold the models).

    python -m bench.peers.cpu [--bundle bundles/default] [--seconds 8] [--rounds 3] [--servers ...]
                              [--json docs/results/peers_cpu.json]

A shared 2-core machine drifts by ±15% from minute to minute, so the servers are measured in
alternating rounds (each round starts every server afresh, in the same order) and compared round by
round: the ratio to Triton is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from pathlib import Path
from typing import Any

from bench import tail
from bench.loadgen import closed_loop
from bench.peers.servers import member_names, session, start_ray, start_triton
from bench.stop_margin import process_cpu_s
from models.machine import machine

SERVERS = ("coinserve-coded", "coinserve-wait-all", "ray-serve", "triton")


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
        "cpu_ms_per_request": round((model_s + front_s) * 1000 / answered, 3),
        "processes": len(used),
    }


def coinserve(bundle: Path, k: int, modes: list[str], bodies: list[bytes], seconds: float) -> dict[str, Any]:
    out = {}
    workers = tail.start_workers(bundle, k)
    try:
        models = [c.process.pid for c in workers.children]
        for mode in modes:
            spec = tail.Spec(mode, 0.0, "none", 0.999 if mode == "coded" else None)
            gateway = tail.start_gateway(workers, spec, bundle, k, 5.0)
            try:
                everyone = models + [gateway.children[0].process.pid]
                out[f"coinserve-{mode}"] = split(tail.infer_url(gateway), bodies, seconds, everyone, models)
            finally:
                gateway.stop()
    finally:
        workers.stop()
    return out


def peer(name: str, bundle: Path, bodies: list[bytes], seconds: float) -> dict[str, Any]:
    server = (start_ray if name == "ray-serve" else start_triton)(bundle, bodies[0], "member-0")
    try:
        return split(server.url, bodies, seconds, session(server.process.pid), server.pids)
    finally:
        server.stop()


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per server the median of its rounds; per coinserve mode the median per-round ratio to Triton."""
    out: dict[str, Any] = {}
    for name in {n for r in rounds for n in r}:
        values = [r[name] for r in rounds if name in r]
        out[name] = {key: round(statistics.median(v[key] for v in values), 3) for key in values[0]}
    for name in ("coinserve-coded", "coinserve-wait-all"):
        pairs = [(r[name], r["triton"]) for r in rounds if name in r and "triton" in r]
        if pairs:
            out[f"{name} / triton"] = {
                "cpu_ms_per_request": [round(a["cpu_ms_per_request"] / b["cpu_ms_per_request"], 3) for a, b in pairs],
                "answered_per_s": [round(a["answered_per_s"] / b["answered_per_s"], 3) for a, b in pairs],
            }
            for key in ("cpu_ms_per_request", "answered_per_s"):
                out[f"{name} / triton"][f"median_{key}"] = statistics.median(out[f"{name} / triton"][key])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path(os.environ.get("COINSERVE_BUNDLE", "bundles/default")))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    servers = args.servers.split(",")
    k = len(member_names(args.bundle))
    bodies = tail.request_bodies(tail.images_of("test").images[:2000])
    modes = [s.removeprefix("coinserve-") for s in servers if s.startswith("coinserve-")]
    rounds: list[dict[str, Any]] = []
    for index in range(args.rounds):
        measured = coinserve(args.bundle, k, modes, bodies, args.seconds) if modes else {}
        for name in ("ray-serve", "triton"):
            if name in servers and (name != "ray-serve" or index == 0):  # Ray: one round (it is 30x off)
                measured[name] = peer(name, args.bundle, bodies, args.seconds)
        rounds.append(measured)
        print(f"round {index + 1}:", json.dumps(measured), flush=True)
    report: dict[str, Any] = {"machine": machine(), "bundle": str(args.bundle), "seconds": args.seconds}
    report.update(summary(rounds))
    report["rounds"] = rounds
    print(json.dumps({k_: v for k_, v in report.items() if k_ != "rounds"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
