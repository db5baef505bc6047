"""Where one request's CPU goes, step by step (issue 27, docs/serving.md): the closed loop at
concurrency 32 on the tail benchmark's cluster (k members, one process hosting the coded replica),
each process's CPU seconds per answered request from /proc, and py-spy samples of the gateway and of
member-0 attributing that CPU to the steps of the request path.

    python -m bench.request_cpu [--seconds 10] [--json docs/results/request_cpu.json]

The steps are read off the sampled stacks by the file and function a sample is in (STEPS below), so
the same script measures any version of the code: run it from another checkout's root (with this
file copied there) to compare. py-spy samples the Python stacks; time inside C code (the event
loop's socket calls, torch's kernels) is attributed to the innermost Python frame that called it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench import tail
from bench.loadgen import closed_loop
from bench.peers.servers import member_names
from bench.stop_margin import process_cpu_s
from models.machine import machine

# (step, pattern on "function (file:line)") in order: the first match names a sample's step.
STEPS: list[tuple[str, str]] = [
    ("forward pass (torch)", r"models/|torch/"),
    ("HTTP server and framework (uvicorn, Starlette, FastAPI)", r"uvicorn/|starlette/|fastapi/|h11|httptools"),
    ("V2 request parse and response render", r"protocol/v2\.py|app/validation\.py|app/responses\.py|app/sse\.py"),
    (
        "gateway ↔ worker transport (HTTP client, or channel frames)",
        r"app/upstream\.py|app/channel\.py|protocol/channel\.py|workers/channel\.py|workers/endpoint\.py",
    ),
    ("fan-out, decoding, patience", r"app/fanout\.py|app/decoding\.py|app/patience\.py|app/hedging\.py|models/coding"),
    ("request lifecycle, event log, admission, data plane", r"app/lifecycle\.py|app/eventlog\.py|app/admission\.py"),
    ("request lifecycle, event log, admission, data plane", r"app/dataplane\.py|app/hotpath\.py|app/routes/|app/deps"),
    ("worker batching and results", r"workers/batcher\.py|workers/server\.py|workers/state\.py"),
    ("metrics and console bookkeeping", r"prometheus_client|app/measures\.py|app/status\.py|app/metrics\.py"),
    ("asyncio tasks, futures and timers", r"asyncio/(tasks|futures|locks|queues|events|base_events)\.py"),
    ("thread hand-off (executor)", r"concurrent/futures|threading\.py"),
    ("event loop and socket I/O (C)", r"Runner\.run|asyncio/runners\.py"),
]


def step_of(frames: list[str]) -> str:
    """The step of one sampled stack: its innermost frame that matches a step, else 'other'."""
    for frame in reversed(frames):
        for step, pattern in STEPS:
            if re.search(pattern, frame):
                return step
    return "other"


def sample(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is missing: pip install py-spy (it is in the project's bench extra)")
    command = [py_spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250", "-f", "raw", "-o", str(out)]
    return subprocess.Popen([*command, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def shares(raw: Path) -> dict[str, float]:
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[step_of(stack.split(";"))] += int(n)
    total = sum(counts.values()) or 1
    return {step: round(n / total, 4) for step, n in counts.most_common()}


def measure(bundle: Path, seconds: float) -> dict[str, Any]:
    bodies = tail.request_bodies(tail.images_of("test").images[:2000])
    k = len(member_names(bundle))
    workers = tail.start_workers(bundle, k)
    try:
        gateway = tail.start_gateway(workers, tail.Spec("coded", 0.0, "none", 0.999), bundle, k, 5.0)
        try:
            url = tail.infer_url(gateway)
            pids = {c.name: c.process.pid for c in workers.children}
            pids["gateway"] = gateway.children[0].process.pid
            asyncio.run(closed_loop(url, bodies, 32, 2.0))
            folder = Path(tempfile.mkdtemp(prefix="request-cpu-"))
            spies = {n: sample(pids[n], seconds, folder / f"{n}.txt") for n in ("gateway", "member-0")}
            before = {n: process_cpu_s(p) for n, p in pids.items()}
            run = asyncio.run(closed_loop(url, bodies, 32, seconds))
            after = {n: process_cpu_s(p) for n, p in pids.items()}
            for spy in spies.values():
                spy.wait()
        finally:
            gateway.stop()
    finally:
        workers.stop()
    answered = len(run.ok())
    per_request = {n: round((after[n] - before[n]) * 1e6 / answered, 1) for n in pids}
    report: dict[str, Any] = {
        "machine": machine(),
        "answered_per_s": round(answered / run.seconds, 1),
        "cpu_us_per_request": per_request,
        "total_us_per_request": round(sum(per_request.values()), 1),
        "steps_us_per_request": {},
    }
    for name in ("gateway", "member-0"):
        share = shares(folder / f"{name}.txt")
        report["steps_us_per_request"][name] = {s: round(f * per_request[name], 1) for s, f in share.items()}
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report = measure(args.bundle, args.seconds)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
