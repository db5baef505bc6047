"""Refinement only where it pays (issue 31), on a real cluster: every worker's coarse resolutions
are made really slower (the `slow_resolution` fault adds 30 ms to each of their passes, timed like any
pass), so the workers measure them no cheaper than float32 and skip them, and every surface says so."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.loadgen import metric_sum
from tests.integration.conftest import Running, parse_sse, request_body, running

SSE = {"Accept": "text/event-stream"}
MEMBERS = ("member-0", "member-1", "member-2")


def _final_resolution(bundle: Path) -> int:
    return len(json.loads((bundle / "manifest.json").read_text())["refinement"]["planes"])


@pytest.fixture(scope="module")
def slow_coarse(coded_bundle: Path) -> Iterator[tuple[Running, int]]:
    final = _final_resolution(coded_bundle)
    env = {
        "COINSERVE_WORKER_COARSE": "measured",
        "COINSERVE_WORKER_FAULT_SLOW_RESOLUTION": ",".join(f"{i}:30" for i in range(final)),
    }
    with running(coded_bundle, env=env) as service:
        yield service, final


def _infer(url: str, parameters: dict | None = None, headers: dict | None = None) -> httpx.Response:
    body = request_body(1, parameters)
    return httpx.post(f"{url}/v2/models/fashion/infer", json=body, headers=headers, timeout=30)


def _coarse_rows(service: Running) -> float:
    return sum(
        service.worker_metric(m, 'coinserve_worker_rows_computed_total{resolution="0"}') for m in MEMBERS
    )  # fmt: skip


def test_a_refining_request_gets_the_float32_answer_first_and_only(slow_coarse):
    """1. a stream (SSE) and a JSON call with a deadline, both of which ask for refinement.
    Result: no event at a coarse resolution, no coarse row computed by any member, no `coarse_slower`."""
    service, final = slow_coarse
    before = _coarse_rows(service)
    events = parse_sse(_infer(service.url, headers=SSE).text)
    deadline = _infer(service.url, {"deadline_ms": 5000})
    assert deadline.status_code == 200, deadline.text
    assert events[-1]["event"] == "final"
    assert [e["data"]["parameters"]["resolution"] for e in events] == [final] * len(events)
    assert deadline.json()["parameters"]["resolution"] == final
    assert all("coarse_slower" not in e["data"]["parameters"] for e in events)
    assert _coarse_rows(service) == before


def test_a_request_that_asks_for_coarse_answers_gets_them_marked_slower(slow_coarse):
    service, final = slow_coarse
    events = parse_sse(_infer(service.url, {"coarse": True}, SSE).text)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "coarse" and kinds[-1] == "final" and kinds.count("final") == 1, kinds
    assert events[0]["data"]["parameters"]["resolution"] == 0
    assert events[0]["data"]["parameters"]["coarse_slower"] is True
    assert events[-1]["data"]["parameters"]["coarse_slower"] is True


def test_a_coarse_parameter_that_is_not_a_boolean_is_a_400_naming_it(slow_coarse):
    service, _ = slow_coarse
    response = _infer(service.url, {"coarse": "yes"})
    assert response.status_code == 400
    assert response.json() == {"error": "parameters.coarse must be true or false, got 'yes'"}


def test_metadata_configuration_status_and_metrics_list_the_live_resolutions(slow_coarse):
    service, final = slow_coarse
    url = service.url
    meta = httpx.get(f"{url}/v2/models/fashion", timeout=10).json()["parameters"]["refinement"]
    config = httpx.get(f"{url}/v2/models/fashion/config", timeout=10).json()
    listed = json.loads(config["parameters"]["refinement"]["string_value"])
    status = {r["name"]: r for r in httpx.get(f"{url}/v1/status", timeout=10).json()["replicas"]}
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    for name in MEMBERS:
        assert meta[name]["live"] == [final] and listed[name]["live"] == [final]
        assert status[name]["resolutions"]["live"] == [final]
        assert meta[name]["typical"][final] == 1.0 and meta[name]["batch_1"][0] > 1.0
        reason = status[name]["resolutions"]["reasons"][0]
        assert "× float32 at batch" in reason and "skipped" in reason, reason
        assert metric_sum(url, f'coinserve_resolution_live{{replica="{name}",resolution="0"}}') == 0
        assert metric_sum(url, f'coinserve_resolution_live{{replica="{name}",resolution="{final}"}}') == 1
        assert metric_sum(url, f'coinserve_resolution_cost_ratio{{replica="{name}",resolution="0"}}') > 1
    assert "coinserve_resolution_cost_ratio" in metrics
