"""Where one request's CPU goes, step by step (issue 27, docs/serving.md): the closed loop at
concurrency 32 on the tail benchmark's cluster (k members, one process hosting the coded replica),
each process's CPU seconds per answered request from /proc, and py-spy samples of the gateway and of
member-0 attributing that CPU to the steps of the request path.

    python -m bench.request_cpu [--seconds 10] [--json docs/results/request_cpu.json]

The steps are read off the sampled stacks by the file and function a sample is in (STEPS below), so
the same script measures any version of the code: run it from another checkout's root (with this
file copied there) to compare. The gateway's one thread is split by py-spy's samples (time inside
C code, the event loop's socket calls, is attributed to the innermost Python frame that called
it); a worker's forward passes are its own counter of their thread CPU, its event loop is split
by samples of its main thread, and what else its compute thread spends is shown apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app import launcher
from bench import tail
from bench.loadgen import closed_loop, metric_sum
from bench.peers.servers import member_names
from bench.stop_margin import process_cpu_s
from models.machine import machine

# (step, pattern on "function (file:line)") in order: the first match names a sample's step.
STEPS: list[tuple[str, str]] = [
    ("fan-out, decoding, patience", r"app/fanout\.py|app/decoding\.py|app/patience\.py|app/hedging\.py|models/coding"),
    ("forward pass (torch)", r"models/|torch/"),
    ("HTTP server and framework (uvicorn, Starlette, FastAPI)", r"uvicorn/|starlette/|fastapi/|h11|httptools"),
    ("V2 request parse and response render", r"protocol/v2\.py|app/validation\.py|app/responses\.py|app/sse\.py"),
    (
        "gateway ↔ worker transport (HTTP client, or channel frames)",
        r"app/upstream\.py|app/channel\.py|protocol/channel\.py|workers/channel\.py|workers/endpoint\.py",
    ),
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
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise SystemExit("py-spy is missing: pip install py-spy (it is in the project's bench extra)")
    command = [py_spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250", "-f", "raw", "--threads"]
    command += ["-o", str(out)]
    return subprocess.Popen([*command, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`, from /proc."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def steps_us(raw: Path, cpu_s: dict[int, float], answered: int) -> dict[str, float]:
    """Each thread's CPU per request, split over the steps in the proportions of its own samples
    (a thread's samples, not the process's: an idle thread's waits would otherwise take a share)."""
    counts: dict[int, Counter[str]] = {}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        match = re.match(r"thread \((\d+)\)", frames[0]) if frames else None
        if match:
            counts.setdefault(int(match.group(1)), Counter())[step_of(frames[1:])] += int(n)
    out: Counter[str] = Counter()
    for tid, seconds in cpu_s.items():
        samples = counts.get(tid)
        if not samples or seconds <= 0:
            continue
        total = sum(samples.values())
        for step, n in samples.items():
            out[step] += seconds * 1e6 / answered * n / total
    return {step: round(us, 1) for step, us in out.most_common()}


@contextmanager
def coded_cluster(bundle: Path) -> Iterator[tuple[launcher.Cluster, launcher.Cluster]]:
    """The tail benchmark's cluster under the product's default policy (coded, patience quantile
    0.999): → (the k + 1 workers, the gateway), both stopped at the end."""
    k = len(member_names(bundle))
    workers = tail.start_workers(bundle, k)
    try:
        gateway = tail.start_gateway(workers, tail.Spec("coded", 0.0, "none", 0.999), bundle, k, 5.0)
        try:
            yield workers, gateway
        finally:
            gateway.stop()
    finally:
        workers.stop()


def measure(bundle: Path, seconds: float) -> dict[str, Any]:
    bodies = tail.request_bodies(tail.images_of("test").images[:2000])
    with coded_cluster(bundle) as (workers, gateway):
        url = tail.infer_url(gateway)
        pids = {c.name: c.process.pid for c in workers.children}
        member = next(c for c in workers.children if c.name == "member-0")
        pids["gateway"] = gateway.children[0].process.pid
        asyncio.run(closed_loop(url, bodies, 32, 2.0))
        folder = Path(tempfile.mkdtemp(prefix="request-cpu-"))
        spies = {n: sample(pids[n], seconds, folder / f"{n}.txt") for n in ("gateway", "member-0")}
        before = {n: process_cpu_s(p) for n, p in pids.items()}
        threads_before = {n: thread_cpu_s(pids[n]) for n in spies}
        compute_before = metric_sum(member.url, "coinserve_worker_compute_cpu_seconds_total")
        run = asyncio.run(closed_loop(url, bodies, 32, seconds))
        compute_after = metric_sum(member.url, "coinserve_worker_compute_cpu_seconds_total")
        threads_after = {n: thread_cpu_s(pids[n]) for n in spies}
        after = {n: process_cpu_s(p) for n, p in pids.items()}
        for spy in spies.values():
            spy.wait()
    answered = len(run.ok())
    per_request = {n: round((after[n] - before[n]) * 1e6 / answered, 1) for n in pids}
    report: dict[str, Any] = {
        "machine": machine(),
        "answered_per_s": round(answered / run.seconds, 1),
        "cpu_us_per_request": per_request,
        "total_us_per_request": round(sum(per_request.values()), 1),
        "steps_us_per_request": {},
    }
    used = {n: {t: s - threads_before[n].get(t, 0.0) for t, s in threads_after[n].items()} for n in spies}
    report["steps_us_per_request"]["gateway"] = steps_us(folder / "gateway.txt", used["gateway"], answered)
    # A worker: its forward passes by its own counter (thread CPU of the forward steps); its event
    # loop (the main thread) split by py-spy's samples; the rest of its threads' CPU around the steps.
    pid = pids["member-0"]
    main_thread = {pid: used["member-0"].get(pid, 0.0)}
    worker = steps_us(folder / "member-0.txt", main_thread, answered)
    compute_us = (compute_after - compute_before) * 1e6 / answered
    others_us = sum(s for t, s in used["member-0"].items() if t != pid) * 1e6 / answered
    worker["forward pass (the worker's own counter)"] = round(compute_us, 1)
    worker["compute thread around the forward pass (hand-off, tensors)"] = round(max(others_us - compute_us, 0.0), 1)
    report["steps_us_per_request"]["member-0"] = dict(sorted(worker.items(), key=lambda kv: -kv[1]))
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
