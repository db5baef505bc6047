"""The first impression is exact (issue 29): the first requests after the service says it is ready
are answered from every member's own answer, not decoded because a member that had just started
ran past the gateway's first patience.

The service is started as `coinserve up` starts it (app/launcher.py `start`, then `wait_ready`), and
the requests go out as soon as it is ready, one after another, each with a 500 ms deadline: far more
than an exact answer needs, so nothing may be decoded. A cold member is decoded only when the coded
replica answers first; which cold process wins that race is chance, so the test takes the coded
replica's first call off it (one call straight to it, as an earlier gateway might have made): every
member must then be warm when it says ready.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import call_worker, images_of, request_body, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
MEMBERS = ("member-0", "member-1", "member-2")


def test_the_first_requests_after_ready_are_exact(coded_bundle: Path) -> None:
    with running(coded_bundle) as service, httpx.Client(base_url=service.url, timeout=30) as client:
        coded = next(c for c in service.cluster.children if c.name.startswith("coded"))
        assert not call_worker(coded, images_of(1), final_only=False).errors
        answers = []
        for seed in range(20):
            response = client.post("/v2/models/fashion/infer", json=request_body(1, {"deadline_ms": 500}, seed=seed))
            assert response.status_code == 200, response.text
            answers.append(response.json()["parameters"])
    late = [(i, p["decoded_members"], p["elapsed_ms"]) for i, p in enumerate(answers) if p["approximate"]]
    assert not late, f"approximate answers right after ready (request, decoded members, ms): {late}"
    assert all(sorted(p["exact_members"]) == list(MEMBERS) for p in answers)


def test_the_workers_report_their_warm_up_and_the_gateway_uses_it(coded_bundle: Path) -> None:
    """Each worker runs every resolution before it says ready and reports the fastest batch-1 time
    of each (readiness, metadata); the gateway's first patience per member comes from it, never
    below the configured initial patience (/metrics `coinserve_replica_patience_seconds`)."""
    from bench.loadgen import metric_sum

    with running(coded_bundle, env={"COINSERVE_PATIENCE_INITIAL_MS": "0.001"}) as service:
        with httpx.Client(timeout=10) as client:
            for name in MEMBERS:
                ready = client.get(f"{service.child(name).url}/v2/health/ready").json()
                warm = ready["warm_up"][name]["batch_1_ms"]
                assert len(warm) == 2 and all(ms > 0 for ms in warm)
                meta = client.get(f"{service.child(name).url}/v2/models/{name}").json()
                assert meta["parameters"]["warm_batch_1_ms"] == warm
        patience = metric_sum(service.url, "coinserve_replica_patience_seconds")
        assert patience > 3 * 0.001 / 1000  # seeded from the warm-up: more than the tiny initial patience
