"""Triton's statistics as the gateway keeps them: stage durations partition each success."""

from __future__ import annotations

import time

from app.statistics import Statistics


def test_a_success_splits_into_the_four_stages():
    stats = Statistics()
    arrival = time.perf_counter() - 0.010
    stats.succeeded(arrival, arrival + 0.001, arrival + 0.002, arrival + 0.008, rows=3)
    got = stats.model_stats("m", "1")
    inference = got["inference_stats"]
    assert (got["inference_count"], got["execution_count"]) == (3, 1)
    assert inference["compute_input"] == {"count": 1, "ns": 1_000_000}
    assert inference["queue"] == {"count": 1, "ns": 1_000_000}
    assert inference["compute_infer"] == {"count": 1, "ns": 6_000_000}
    stages = sum(inference[s]["ns"] for s in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert abs(stages - inference["success"]["ns"]) <= 2 and inference["success"]["ns"] >= 10_000_000
    assert inference["fail"] == {"count": 0, "ns": 0}


def test_a_failure_counts_only_as_a_failure():
    stats = Statistics()
    assert stats.model_stats("m", "1")["last_inference"] == 0
    stats.failed(time.perf_counter() - 0.005)
    got = stats.model_stats("m", "1")
    assert got["inference_stats"]["fail"]["count"] == 1 and got["inference_stats"]["fail"]["ns"] >= 5_000_000
    assert got["inference_stats"]["success"] == {"count": 0, "ns": 0} and got["execution_count"] == 0
    assert abs(got["last_inference"] - time.time() * 1000) < 5_000
