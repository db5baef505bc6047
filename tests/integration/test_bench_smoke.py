"""The tail benchmark's --quick variant as a CI smoke test: every mode runs against real processes
with real SIGSTOP stragglers and writes the rows, page and plots that the full sweep writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
KEYS = {"mode", "load", "trial", "p50_ms", "p99_ms", "p999_ms", "final_p999_ms", "decoded_fraction", "served_accuracy"}


def test_quick_tail_benchmark_writes_every_mode(coded_bundle, tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "bench.tail", "--quick", "--bundle", str(coded_bundle)]
    subprocess.run([*command, "--json", str(out / "tail.json"), "--out", str(out)], check=True, timeout=280)
    rows = json.loads((out / "tail.json").read_text())["rows"]
    assert {r["mode"] for r in rows} == {"wait-all", "hedge", "coded", "coded+refine"}
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["requests"] == 300 and r["errors"] == 0
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"]
        assert 0.5 < r["served_accuracy"] <= 1
    coded = next(r for r in rows if r["mode"] == "coded")
    assert coded["decoded_fraction"] > 0  # the coded replica really stood in for stragglers
    assert (out / "tail.md").read_text().startswith("# Tail latency")
    assert list(out.glob("tail_cdf_*.png"))
