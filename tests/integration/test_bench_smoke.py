"""The tail benchmark's --quick variant as a CI smoke test: every mode runs against real processes
with real SIGSTOP stragglers, next to a straggler-free coded run, and writes the rows, raw requests,
page and plots that the full sweep writes; --from-raw recomputes the same figures from the raw file."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
KEYS = {
    "mode",
    "load",
    "trial",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "final_p999_ms",
    "approximate_fraction",
    "served_accuracy",
}
MODES = {"wait-all", "hedge", "coded", "coded-eager", "coded+refine"}


def run_bench(command, timeout_s):
    """Run it in its own process group: on a time-out its workers and gateway (some perhaps paused
    by SIGSTOP) go with it instead of outliving the test."""
    process = subprocess.Popen(command, start_new_session=True)
    try:
        assert process.wait(timeout=timeout_s) == 0
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGCONT)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise


@pytest.fixture(scope="module")
def quick(coded_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    # The overload guard (503 once the gateway's loop is 5 ms behind) is relaxed: this test is about
    # stragglers and decoding, admission has its own tests, and CI machines are shared.
    command = [sys.executable, "-m", "bench.tail", "--quick", "--bundle", str(coded_bundle), "--out", str(out)]
    run_bench([*command, "--gateway-env", "COINSERVE_OVERLOAD_LAG_MS=1000"], 280)
    return out


def coded_runs(out):
    with gzip.open(out / "tail_raw.json.gz", "rb") as f:
        runs = json.loads(f.read())["runs"]
    return {r["intensity"]: r["requests"] for r in runs if r["mode"] == "coded"}


def test_quick_tail_benchmark_writes_every_mode(quick):
    document = json.loads((quick / "tail.json").read_text())
    rows = document["rows"]
    assert {(r["mode"], r["intensity"]) for r in rows} == {(m, "high") for m in MODES} | {("coded", "none")}
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["requests"] == 200 and r["errors"] == 0
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"]
        assert 0.5 < r["served_accuracy"] <= 1
    for line in document["pooled"]:
        low, high = line["p999_ci_ms"]
        assert low <= high and line["requests"] == 200
    assert (quick / "tail.md").read_text().startswith("# Tail latency")
    assert list(quick.glob("tail_cdf_*.png")) and (quick / "tail_pareto.png").exists()


def test_coded_decodes_because_of_the_injected_stragglers(quick):
    """1. coded (patient) runs once without stragglers, once under the high-intensity schedule.
    Result: without stragglers at most a few % of its answers are approximate (a machine shared with
    other work has hiccups of its own); with them it decodes more often than that, and several of its
    decoded answers stood in for a member that was paused (SIGSTOP) while the request was in flight.
    (Not "at least half": a hiccup of the whole machine makes every member late at once.)"""
    runs = coded_runs(quick)
    calm, straggled = runs["none"], runs["high"]
    assert not any(calm["touched"])
    calm_share = sum(calm["approximate"]) / len(calm["approximate"])
    assert calm_share <= 0.05
    assert sum(straggled["approximate"]) / len(straggled["approximate"]) > calm_share
    assert sum(straggled["decoded_while_paused"]) >= 3


def test_from_raw_recomputes_the_same_figures(quick, tmp_path):
    again = tmp_path / "again"
    command = [sys.executable, "-m", "bench.tail", "--from-raw", str(quick / "tail_raw.json.gz"), "--out", str(again)]
    run_bench(command, 60)
    first, second = (json.loads((d / "tail.json").read_text()) for d in (quick, again))
    assert second["pooled"] == first["pooled"] and second["verdicts"] == first["verdicts"]
    assert second["rows"] == first["rows"]
