"""A member paused by SIGSTOP under 4 concurrent clients (issue 27): does any JSON request without a
deadline wait longer than the member's patience plus 100 ms?

The reproduction of the issue, scaled up: `coinserve up`'s cluster on the bundle; 20 warm-up JSON
requests; 300 JSON requests from 4 clients; SIGSTOP member-0; then `--requests` JSON requests from
4 concurrent clients with a 10 s client time-out. The member's patience is sampled from /v1/status
every 50 ms meanwhile; a request is late if it took longer than the largest patience seen while it
ran plus 100 ms. Before the pause, the share of approximate answers (target ≤ 1%) is reported too.

    python -m bench.paused_member [--bundle bundles/default] [--requests 2000] [--json PATH]

Raw per-request times go to the JSON next to the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from app import launcher
from bench.loadgen import json_body, percentiles
from models.data import load_split
from models.machine import machine

MEMBER = "member-0"
SLACK_MS = 100.0


class PatienceLog(threading.Thread):
    """member-0's patience from /v1/status, every 50 ms: (time.perf_counter(), patience_ms)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.samples, self.stop_flag = url, [(time.perf_counter(), 0.0)], threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self.stop_flag.is_set():
                try:
                    replicas = client.get(f"{self.url}/v1/status").json()["replicas"]
                    patience = next(r["patience_ms"] for r in replicas if r["name"] == MEMBER)
                    self.samples.append((time.perf_counter(), float(patience)))
                except (httpx.HTTPError, KeyError, StopIteration, ValueError):
                    pass
                self.stop_flag.wait(0.05)

    def largest(self, start: float, end: float) -> float:
        """The largest patience in force while a request ran (the last sample before it, and all during)."""
        before = [p for t, p in self.samples if t <= start]
        during = [p for t, p in self.samples if start < t <= end]
        return max([before[-1] if before else 0.0, *during])


def send_all(url: str, bodies: list[bytes], clients: int, timeout_s: float) -> list[dict[str, Any]]:
    """Every body once, from `clients` threads with keep-alive connections: start, end, outcome."""
    rows: list[dict[str, Any]] = []
    lock = threading.Lock()
    queue = iter(range(len(bodies)))

    def client() -> None:
        with httpx.Client(timeout=timeout_s) as session:
            while True:
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    response = session.post(url, content=bodies[i], headers={"Content-Type": "application/json"})
                    body = response.json()
                    row = {"status": response.status_code, "approximate": body.get("parameters", {}).get("approximate")}
                    row["decoded"] = body.get("parameters", {}).get("decoded_members")
                except httpx.TimeoutException:
                    row = {"status": "timeout"}
                row.update(start=start, end=time.perf_counter())
                with lock:
                    rows.append(row)

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path(os.environ.get("COINSERVE_BUNDLE", "bundles/default")))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    images = load_split("test").images
    bodies = [json_body(images[i % len(images) : i % len(images) + 1]) for i in range(args.requests + 320)]
    cluster = launcher.start(args.bundle, launcher.free_port())
    try:
        launcher.wait_ready(cluster)
        gateway = cluster.children[-1].url
        url = f"{gateway}/v2/models/fashion/infer"
        send_all(url, bodies[:20], 1, 10.0)
        before = send_all(url, bodies[20:320], 4, 10.0)
        log = PatienceLog(gateway)
        log.start()
        member = next(c for c in cluster.children if c.name == MEMBER)
        os.kill(member.process.pid, signal.SIGSTOP)
        try:
            paused = send_all(url, bodies[320:], 4, 10.0)
        finally:
            os.kill(member.process.pid, signal.SIGCONT)
            log.stop_flag.set()
            log.join()
    finally:
        cluster.stop()
    report = summarise(before, paused, log)
    print(json.dumps(report["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def summarise(before: list[dict[str, Any]], paused: list[dict[str, Any]], log: PatienceLog) -> dict[str, Any]:
    for row in paused:
        row["ms"] = (row["end"] - row["start"]) * 1000
        row["patience_ms"] = log.largest(row["start"], row["end"])
        row["late"] = row["status"] != 200 or row["ms"] > row["patience_ms"] + SLACK_MS
    times = [r["ms"] for r in paused]
    p50, p99, p999 = percentiles(times)
    approximate_before = sum(bool(r.get("approximate")) for r in before)
    summary = {
        "machine": machine(),
        "requests_paused": len(paused),
        "late": sum(r["late"] for r in paused),
        "errors": sum(r["status"] != 200 for r in paused),
        "decoded_member_0": sum(MEMBER in (r.get("decoded") or []) for r in paused),
        "ms_p50_p99_p999_max": [round(p50, 1), round(p99, 1), round(p999, 1), round(max(times), 1)],
        "worst_margin_ms": round(max(r["ms"] - r["patience_ms"] for r in paused), 1),
        "patience_ms_range": [round(min(p for _, p in log.samples[1:]), 1), round(max(p for _, p in log.samples), 1)],
        "approximate_before_pause_pct": round(100 * approximate_before / len(before), 2),
    }
    raw = [
        {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k not in ("start", "end")}
        for r in paused
    ]
    return {"summary": summary, "paused": raw}


if __name__ == "__main__":
    main()
