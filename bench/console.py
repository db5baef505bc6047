"""The web console as a newcomer meets it (issue 16): how soon a click shows a final answer, and
what an open console costs the serving path.

    python -m bench.console [--bundle bundles/default] [--json docs/results/console.json] [--quick]
    python -m bench.console --url http://127.0.0.1:8000     # a service already up (`./dev.sh up`)

1. Click to final: the bundle served by the launcher `coinserve up` uses (k members, the coded
   replica, the gateway), Chromium headless on the gateway's `/`, each example button clicked in
   turn with a pause between clicks. Two clocks: the page's own (performance.now() in the click
   handler to the final event drawn: `data-elapsed-ms` on `final-label`), and selenium's (the
   click() call to seeing the final in the DOM, polled every 10 ms: an upper bound that includes
   WebDriver's round trips). The first click after the page loads is included.
2. Cost of the status endpoint: a closed loop of the bundle's example inputs (JSON, one per request,
   concurrency 32, answered requests per second) in three arms, interleaved with the order rotated
   each round: `none` (nothing else), `poll` (a separate process fetching /v1/status every second,
   as the console does) and `console` (the console itself open in Chromium, polling and redrawing the
   cluster panel: the browser's own CPU on this machine counts). Each arm's ratio to `none` comes
   with a bootstrap 95% interval over the paired rounds.
The raw numbers (every click, every trial) go into the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from app import launcher
from bench.browser import chromium
from bench.loadgen import Body, closed_loop, percentiles
from bench.serving import bootstrap_ci
from models.machine import machine

ARMS = ("none", "poll", "console")
FINAL = "return document.querySelector('[data-testid=\"final-label\"]').dataset"


def _wait(driver: Any, condition: Any, timeout: float = 30.0, poll: float = 0.01) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=poll).until(condition)


def clicks(driver: Any, url: str, count: int, pause_s: float) -> list[dict[str, Any]]:
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="example-0"]'))
    examples = len(driver.find_elements(By.CSS_SELECTOR, '[data-testid^="example-"]'))
    rows = []
    for i in range(count):
        index = i % examples
        button = driver.find_element(By.CSS_SELECTOR, f'[data-testid="example-{index}"]')
        start = time.perf_counter()
        button.click()
        data = _wait(
            driver, lambda d: (s := d.execute_script(FINAL)).get("state") in {"exact", "approximate", "error"} and s
        )
        seen_ms = (time.perf_counter() - start) * 1000
        page_ms = float(data["elapsedMs"]) if "elapsedMs" in data else None  # none on an error
        row = {"click": i, "example": index, "page_ms": page_ms, "selenium_ms": seen_ms}
        row["state"] = data["state"]
        rows.append(row)
        print(
            f"click {i}: example {index} {row['state']} page {page_ms} ms, selenium {seen_ms:.1f} ms",
            flush=True,
        )
        time.sleep(pause_s)
    return rows


def click_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"clicks": len(rows), "errors": sum(r["state"] == "error" for r in rows)}
    out["exact"] = sum(r["state"] == "exact" for r in rows)
    for clock in ("page_ms", "selenium_ms"):
        values = [r[clock] for r in rows if r[clock] is not None]
        p50, p99, _ = percentiles(values)
        out[clock] = {
            "p50": round(p50, 1),
            "p50_ci95": bootstrap_ci(values, 50),
            "p99": round(p99, 1),
            "max": round(max(values), 1),
            "over_2000": sum(v > 2000 for v in values),
        }
    return out


POLL_SCRIPT = """
import sys, time, httpx
with httpx.Client(timeout=5) as client:
    while True:
        client.get(sys.argv[1] + "/v1/status").raise_for_status()
        time.sleep(1.0)
"""


class Poller:
    """GET /v1/status once a second, as the console does, from a process of its own (a thread in
    this one would take the load generator's interpreter lock, and measure that instead)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Poller:
        self.process = subprocess.Popen([sys.executable, "-c", POLL_SCRIPT, self.url])
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"the status poller died (exit {self.process.returncode})")
        self.process.terminate()
        self.process.wait()


def cost(driver: Any, url: str, rounds: int, seconds: float) -> dict[str, Any]:
    group = httpx.get(f"{url}/v1/status", timeout=10).json()["group"]
    infer = f"{url}/v2/models/{group}/infer"
    examples = httpx.get(f"{url}/v1/examples", timeout=10).json()["examples"]
    reqs: list[Body] = [orjson.dumps({"inputs": e["inputs"]}) for e in examples]  # the bundle's own inputs
    asyncio.run(closed_loop(infer, reqs, 32, 3.0))  # warm-up
    rows = []
    for r in range(rounds):
        order = ARMS[r % 3 :] + ARMS[: r % 3]
        for arm in order:
            driver.get(url + "/" if arm == "console" else "about:blank")
            if arm == "console":
                _wait(driver, lambda d: d.execute_script("return document.querySelectorAll('.replica').length"))
            if arm == "poll":
                with Poller(url):
                    run = asyncio.run(closed_loop(infer, reqs, 32, seconds))
            else:
                run = asyncio.run(closed_loop(infer, reqs, 32, seconds))
            ok = run.ok()
            row = {
                "round": r,
                "arm": arm,
                "ok_per_s": round(len(ok) / run.seconds, 1),
                "refused": len(run.samples) - len(ok),
            }
            row["p50_ms"] = round(percentiles([s.final_ms for s in ok])[0], 2)
            print(
                f"round {r} {arm}: {row['ok_per_s']} answered/s, p50 {row['p50_ms']} ms, {row['refused']} refused",
                flush=True,
            )
            rows.append(row)
    driver.get("about:blank")
    out: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "concurrency": 32, "trials": rows}
    base = {r["round"]: r["ok_per_s"] for r in rows if r["arm"] == "none"}
    for arm in ARMS:
        out[f"{arm}_median_ok_per_s"] = float(np.median([r["ok_per_s"] for r in rows if r["arm"] == arm]))
    rng = np.random.default_rng(0)
    for arm in ARMS[1:]:
        ratios = np.array([r["ok_per_s"] / base[r["round"]] for r in rows if r["arm"] == arm])
        draws = [float(np.median(rng.choice(ratios, len(ratios)))) for _ in range(2000)]
        out[f"{arm}_ratio"] = {
            "median": round(float(np.median(ratios)), 3),
            "ci95": [round(float(np.percentile(draws, 2.5)), 3), round(float(np.percentile(draws, 97.5)), 3)],
            "per_round": [round(float(x), 3) for x in ratios],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path(os.environ.get("COINSERVE_BUNDLE", "bundles/default")))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="a few clicks and one round (a smoke test)")
    parser.add_argument("--url", default=None, help="measure this running gateway instead of starting one")
    args = parser.parse_args()
    count, rounds, seconds = (8, 1, 3.0) if args.quick else (64, 12, 10.0)
    report: dict[str, Any] = {"machine": machine(), "quick": args.quick, "bundle": str(args.bundle)}
    print(json.dumps(report["machine"]), flush=True)
    # as `coinserve up` runs it, except that the lag guard is off for the throughput arms: they
    # compare what the gateway gets through, not how it sheds load
    cluster = None
    if args.url is None:
        cluster = launcher.start(args.bundle, launcher.free_port(), env={"COINSERVE_OVERLOAD_LAG_MS": "100000"})
    driver = None
    try:
        if cluster is not None:
            launcher.wait_ready(cluster)
        url = args.url.rstrip("/") if args.url else cluster.children[-1].url
        report["url"] = url
        driver = chromium()
        rows = clicks(driver, url, count, pause_s=0.5)
        report["click_to_final"] = {**click_summary(rows), "raw": rows}
        print("click to final:", json.dumps({k: v for k, v in report["click_to_final"].items() if k != "raw"}))
        report["status_cost"] = cost(driver, url, rounds, seconds)
        print("status cost:", json.dumps({k: v for k, v in report["status_cost"].items() if k != "trials"}))
    finally:
        if driver is not None:
            driver.quit()
        if cluster is not None:
            cluster.stop()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
