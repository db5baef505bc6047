"""Against the servers users would pick instead (issue 20): coinserve (`coded`, and `wait-all` as the
shared reference), Ray Serve and Triton serving the same bundle's k members, in the same run, on the
same cores, under the same seeded SIGSTOP schedule and the same open-loop Poisson rates.

    coinserve bench peers [--quick] [--json docs/results/peers.json]     (about 15 minutes; --quick ~4)

Each server has k + 1 model processes: coinserve's k members and the process hosting its coded
replica; the peers' k members and a second replica of member-0 (`EXTRA`: every member is asked by
every request, so each is "the most loaded"; member-0 is the one its second replica relieves). The
straggler schedule pauses slot i = member i's (first) process and slot k = the extra one, found by
pid in each server's own process tree (bench/peers/servers.py). Rates are fractions of coinserve
`coded`'s closed-loop capacity, the same absolute rates for every server. The peers run in their own
cached venvs (bench/peers/venvs.py); every process started is stopped at the end.

Reported per (server, load, intensity, trial) and pooled (95% block-bootstrap intervals, as in the
tail benchmark, bench/tail_report.py): p50/p99/p99.9 of the time to the answer, errors, served
accuracy on the test split; throughput at concurrency 32 without stragglers. Raw requests in
peers_raw.json.gz; page docs/results/peers.md with CDFs.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench import tail
from bench.loadgen import closed_loop, open_loop
from bench.peers.servers import Peer, member_names, start_ray, start_triton
from bench.tail_report import Estimate, interval, pooled_rows, ratio, save_ccdf
from models.machine import machine

EXTRA = "member-0"
SERVERS = ("coinserve-coded", "coinserve-wait-all", "ray-serve", "triton")
PATIENCE_Q = 0.999  # the product's default, chosen on validation (docs/serving.md)


def throughput(url: str, bodies: list[bytes], seconds: float) -> float:
    asyncio.run(closed_loop(url, bodies, 32, 1.0))
    run = asyncio.run(closed_loop(url, bodies, 32, seconds))
    return len(run.ok()) / run.seconds


def warm(url: str, bodies: list[bytes], rate: float, seconds: float) -> None:
    asyncio.run(open_loop(url, bodies[::-1], rate, max(20, int(rate * seconds)), seed=7))


def run_server(name: str, url: str, pids: list[int], args: argparse.Namespace, ctx: dict[str, Any]) -> list[dict]:
    runs = []
    for load, intensity in args.points:
        warm(url, ctx["bodies"], load * ctx["capacity"], args.warmup)
        for trial in range(args.trials):
            runs.append(tail.run_one(tail.Spec(name, load, intensity), trial, url, pids, ctx))
            line = tail.summary_line(runs[-1])
            print(
                json.dumps({k: line[k] for k in ("mode", "load", "intensity", "trial", "errors", "p50_ms", "p999_ms")}),
                flush=True,
            )
            time.sleep(0.5)
    return runs


def coinserve_runs(args: argparse.Namespace, k: int, ctx: dict[str, Any]) -> tuple[list[dict], dict[str, float]]:
    workers = tail.start_workers(args.bundle, k)
    runs: list[dict] = []
    rates: dict[str, float] = {}
    try:
        pids = [c.process.pid for c in workers.children]
        for mode in ("coded", "wait-all"):
            spec = tail.Spec(mode, 0.0, "none", PATIENCE_Q if mode == "coded" else None)
            gateway = tail.start_gateway(workers, spec, args.bundle, k, 5.0)
            try:
                url = tail.infer_url(gateway)
                rates[f"coinserve-{mode}"] = throughput(url, ctx["bodies"], args.saturation_s)
                if mode == "coded":
                    ctx["capacity"] = rates["coinserve-coded"]
                    print(f"capacity (coinserve coded, concurrency 32): {ctx['capacity']:.0f} req/s", flush=True)
                for run in run_server(f"coinserve-{mode}", url, pids, args, ctx):
                    run["patience_quantile"] = spec.patience_quantile
                    runs.append(run)
            finally:
                gateway.stop()
    finally:
        workers.stop()
    return runs, rates


def peer_runs(name: str, args: argparse.Namespace, ctx: dict[str, Any]) -> tuple[list[dict], float, dict]:
    start = start_ray if name == "ray-serve" else start_triton
    peer: Peer = start(args.bundle, ctx["bodies"][0], EXTRA)
    try:
        rate = throughput(peer.url, ctx["bodies"], args.saturation_s)
        print(f"{name}: {rate:.0f} req/s at concurrency 32; model pids {peer.pids}", flush=True)
        return run_server(name, peer.url, peer.pids, args, ctx), rate, {"pids": peer.pids, **peer.notes}
    finally:
        peer.stop()


def table(rows: list[Any], rates: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        est = {s: Estimate(r.point[s], *interval(r.boot[s]), len(r.first_ms)) for s in ("p50", "p99", "p999")}
        acc = Estimate(r.point["accuracy"] * 100, *interval(r.boot["accuracy"] * 100), len(r.first_ms))
        out.append(
            {
                "server": r.mode,
                "load": r.load,
                "intensity": r.intensity,
                "trial": "pooled",
                "requests": r.requests,
                "errors": r.errors,
                "p50_ms": [round(est["p50"].value, 2), round(est["p50"].low, 2), round(est["p50"].high, 2)],
                "p99_ms": [round(est["p99"].value, 2), round(est["p99"].low, 2), round(est["p99"].high, 2)],
                "p999_ms": [round(est["p999"].value, 2), round(est["p999"].low, 2), round(est["p999"].high, 2)],
                "served_accuracy": [round(acc.value, 3), round(acc.low, 3), round(acc.high, 3)],
                "throughput_c32_per_s": round(rates.get(r.mode, float("nan")), 1),
            }
        )
    return out


def trial_rows(runs: list[dict]) -> list[dict[str, Any]]:
    out = []
    for run in runs:
        r = run["requests"]
        ok = [m for m, o in zip(r["first_ms"], r["outcome"], strict=True) if o == "final"]
        correct = [c for c, o in zip(r["correct"], r["outcome"], strict=True) if o == "final"]
        p50, p99, p999 = (float(np.percentile(ok, p)) if ok else float("nan") for p in (50, 99, 99.9))
        out.append(
            {
                "server": run["mode"], "load": run["load"], "intensity": run["intensity"], "trial": run["trial"],
                "p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "p999_ms": round(p999, 2),
                "errors": len(r["outcome"]) - len(ok),
                "served_accuracy": round(100 * float(np.mean(correct)), 3) if correct else None,
            }
        )  # fmt: skip
    return out


def verdicts(rows: list[Any], rates: dict[str, float]) -> list[dict[str, str]]:
    out = []
    peers = ("ray-serve", "triton")

    def add(check: str, point: str, measured: str, target: str, ok: bool) -> None:
        out.append({"check": check, "point": point, "measured": measured, "target": target,
                    "verdict": "pass" if ok else "**fail**"})  # fmt: skip

    for load, intensity in sorted({(r.load, r.intensity) for r in rows}):
        here = {r.mode: r for r in rows if (r.load, r.intensity) == (load, intensity)}
        coded = here.get("coinserve-coded")
        others = [here[p] for p in peers if p in here]
        if coded is None or not others:
            continue
        point = f"{load:.0%}, {intensity}"
        if intensity != "none":
            best = min(others, key=lambda r: r.point["p999"])
            r = ratio((coded.point["p999"], coded.boot["p999"]), (best.point["p999"], best.boot["p999"]), 0)
            add(f"coded p99.9 / best peer's ({best.mode})", point, r.text(3, "×"), "≤ 0.333×", r.value <= 1 / 3)
            gap = 100 * (coded.point["accuracy"] - max(o.point["accuracy"] for o in others))
            add("coded served accuracy − the best peer's (points)", point, f"{gap:+.2f}", "≥ −0.1", gap >= -0.1)
        elif load == 0.2 and "triton" in here:
            triton = here["triton"]
            r = ratio((coded.point["p50"], coded.boot["p50"]), (triton.point["p50"], triton.boot["p50"]), 0)
            add("coded p50 / Triton's, no stragglers", point, r.text(2, "×"), "≤ 1.0×", r.value <= 1.0)
    best_rate = max((rates[p] for p in peers if p in rates), default=float("nan"))
    mine = rates.get("coinserve-coded", float("nan"))
    measured = f"{mine:.0f} / {best_rate:.0f} req/s = {mine / best_rate:.2f}×"
    add(
        "throughput at concurrency 32, no stragglers: coded / best peer",
        "closed loop",
        measured,
        "≥ 1.0×",
        mine >= best_rate,
    )
    return out


def ccdf(rows: list[Any], load: float, intensity: str, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if (r.load, r.intensity) != (load, intensity) or not len(r.first_ms):
            continue
        x = np.sort(r.first_ms)
        ax.plot(x, 1 - np.arange(len(x)) / len(x), label=f"{r.mode}, n={len(x):,}")
    title = f"coinserve, Ray Serve, Triton: load {load:.0%}, {intensity} stragglers"
    return save_ccdf(fig, ax, "time to the answer (ms, log scale)", title, path)


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    m = report["machine"]
    lines = [
        "# coinserve against Ray Serve and Triton (issues 20 and 27)",
        "",
        f"Regenerate: `{report['command']}`. Machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cpus']} CPUs, "
        f"{m['platform']}; run {m['date']}, {report['seconds']:.0f} s. Peers: {report['peer_versions']}.",
        "",
        "Every server: the bundle's k members on k + 1 model processes (coinserve: + its coded replica; "
        "the peers: + a second replica of member-0), the same float32 forward pass, the same seeded SIGSTOP "
        "schedule on those processes, the same open-loop Poisson rates (fractions of coinserve coded's "
        f"capacity, {report['capacity_per_s']:.0f} req/s). Times are to the answer at the client (JSON). "
        "Brackets: 95% block-bootstrap intervals over the pooled trials.",
        "",
        "| server | load | stragglers | requests | errors | p50 ms | p99 ms | p99.9 ms | served accuracy % "
        "| throughput c=32 req/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:

        def f(v: list[float]) -> str:
            return f"{v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}]"

        lines.append(
            f"| {r['server']} | {r['load']:.0%} | {r['intensity']} | {r['requests']:,} | {r['errors']} "
            f"| {f(r['p50_ms'])} | {f(r['p99_ms'])} | {f(r['p999_ms'])} | {r['served_accuracy'][0]:.2f} "
            f"| {r['throughput_c32_per_s']:.0f} |"
        )
    lines += [
        "",
        "## Against the targets",
        "",
        "| check | point | measured | target | verdict |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {v['check']} | {v['point']} | {v['measured']} | {v['target']} | {v['verdict']} |"
        for v in report["verdicts"]
    ]
    lines += ["", *[f"![{Path(p).name}]({Path(p).name})" for p in plots], ""]
    return "\n".join(lines + why(report))


WHY = """Where the servers' CPU goes (measured). coinserve's gateway is Python (uvicorn, one
event loop) and talks to its k + 1 workers over one persistent binary channel each, every call of
a loop tick in one frame and every answer of a computed step in one (docs/serving.md); a plain
request's coded call is held back and never computed when every member answers in time. Triton's
front end is C++ and its Python-backend instances take dynamic batches over shared memory. On two
shared cores CPU per request is throughput, and a straggler's tail is what each server does about
a member that does not answer: Triton waits for it, coinserve decodes it once it is late. Ray
Serve's per-request cost (its HTTP proxy, the ingress actor and one actor call per member, each a
Python process hop) puts it far behind at every measured rate. CPU per answered request at
saturation (closed loop, concurrency 32; /proc of every process; the median of alternating rounds;
`python -m bench.peers.cpu --json docs/results/peers_cpu.json`):"""


def why(report: dict[str, Any]) -> list[str]:
    cpu_path = Path(report.get("cpu_json", "docs/results/peers_cpu.json"))
    if not cpu_path.exists():
        return []
    cpu = json.loads(cpu_path.read_text())
    lines = ["## Where the CPU goes", "", WHY.split("(measured). ", 1)[1], ""]
    lines += ["| server | answered req/s | model processes CPU ms / request | front end CPU ms / request |"]
    lines += ["|---|---|---|---|"]
    for name in SERVERS:
        if name in cpu:
            c = cpu[name]
            lines.append(
                f"| {name} | {c['answered_per_s']:.0f} | {c['model_processes_cpu_ms_per_request']:.2f} "
                f"| {c['front_end_cpu_ms_per_request']:.2f} |"
            )
    return [*lines, ""]


# the opening of `coinserve bench peers --help`: one full sentence
DESCRIPTION = (
    "Compare coinserve with Ray Serve and Triton serving the same bundle's members, on the same cores, "
    "under the same stragglers and request rates (issue 20)."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--bundle", type=Path, default=Path(os.environ.get("COINSERVE_BUNDLE", "bundles/default")))
    parser.add_argument("--json", type=Path, default=Path("docs/results/peers.json"))
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument(
        "--points", default=None, help="LOAD:INTENSITY,... (default 0.2:none,0.2:medium,0.4:medium,0.6:medium)"
    )
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None, help="per trial")
    parser.add_argument("--quick", action="store_true", help="one trial of 300 requests at 0.2:none and 0.2:high")
    parser.add_argument("--from-raw", type=Path, default=None, help="rewrite the JSON's tables and the page from raw")
    args = parser.parse_args(argv)
    points = args.points or ("0.2:none,0.2:high" if args.quick else "0.2:none,0.2:medium,0.4:medium,0.6:medium")
    args.points = [(float(p.split(":")[0]), p.split(":")[1]) for p in points.split(",")]
    args.trials = args.trials or (1 if args.quick else 2)
    args.requests = args.requests or (300 if args.quick else 2500)
    args.warmup = 1.0 if args.quick else 2.0
    args.saturation_s = 3.0 if args.quick else 8.0
    args.servers = args.servers.split(",")
    args.command = "coinserve bench peers " + " ".join(argv if argv is not None else os.sys.argv[1:])
    return args


def rewrite(args: argparse.Namespace) -> None:
    """Tables, verdicts, plots and page again from peers_raw.json.gz and the run's JSON (throughput,
    machine, command): nothing run."""
    with gzip.open(args.from_raw, "rb") as f:
        raw = orjson.loads(f.read())
    report = json.loads(args.json.read_text())
    rows = pooled_rows(raw)
    rates = report["throughput_c32_per_s"]
    points = sorted({(r.load, r.intensity) for r in rows})
    out = args.json.parent
    plots = [ccdf(rows, load, intensity, out / f"peers_cdf_{intensity}_{load:g}.png") for load, intensity in points]
    report.update(rows=table(rows, rates), verdicts=verdicts(rows, rates))
    args.json.write_text(json.dumps(report, indent=1))
    args.json.with_suffix(".md").write_text(markdown(report, plots))
    print(f"rewrote {args.json} and {args.json.with_suffix('.md')} from {args.from_raw}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_raw:
        rewrite(args)
        return
    started = time.perf_counter()
    k = len(member_names(args.bundle))
    test = tail.images_of("test")
    ctx: dict[str, Any] = {
        "split": "test", "requests": args.requests, "bodies": tail.request_bodies(test.images),
        "labels": test.labels, "min_span_s": tail.QUICK_SPAN_S if args.quick else None,
    }  # fmt: skip
    runs, rates = coinserve_runs(args, k, ctx)  # always: its capacity sets every server's rates
    notes: dict[str, Any] = {}
    for name in ("ray-serve", "triton"):
        if name in args.servers:
            more, rate, notes[name] = peer_runs(name, args, ctx)
            runs += more
            rates[name] = rate
    raw = {"settings": {"requests_per_trial": args.requests, "trials": args.trials, "split": "test",
                        "patience_quantile": PATIENCE_Q, "capacity": ctx["capacity"]}, "runs": runs}  # fmt: skip
    rows = pooled_rows(raw)
    out = args.json.parent
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(out / "peers_raw.json.gz", "wb") as f:
        f.write(orjson.dumps(raw, option=orjson.OPT_SERIALIZE_NUMPY))
    plots = [
        ccdf(rows, load, intensity, out / f"peers_cdf_{intensity}_{load:g}.png") for load, intensity in args.points
    ]
    from bench.peers.venvs import PACKAGES

    report = {
        "command": args.command,
        "machine": machine(),
        "seconds": time.perf_counter() - started,
        "capacity_per_s": ctx["capacity"],
        "peer_versions": {name: pkgs[0] for name, pkgs in PACKAGES.items()},
        "peers": notes,
        "rows": table(rows, rates),
        "trials": trial_rows(runs),
        "throughput_c32_per_s": {k_: round(v, 1) for k_, v in rates.items()},
        "verdicts": verdicts(rows, rates),
    }
    args.json.write_text(json.dumps(report, indent=1))
    args.json.with_suffix(".md").write_text(markdown(report, plots))
    print(f"wrote {args.json} and {args.json.with_suffix('.md')}")


if __name__ == "__main__":
    main()
