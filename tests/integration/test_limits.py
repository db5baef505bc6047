"""Back-pressure with real processes: beyond the concurrency and stream limits the gateway answers
429 with Retry-After at once instead of queueing, and the requests it accepted still end normally."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.conftest import parse_sse, request_body, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
SLOW = {"COINSERVE_WORKER_FAULT_DELAY": "const:1500"}  # every replica holds its reply 1.5 s
REPLICAS = ("member-0", "member-1", "member-2", "coded-coin-0")


def test_a_burst_beyond_the_limits_gets_429_and_the_admitted_requests_finish(coded_bundle):
    """1. Limits: 3 concurrent requests, 2 open streams; every replica answers after 1.5 s.
    2. A burst of 8 JSON calls at once, then (while 3 are held) a stream and a JSON call.
    Result: exactly 3 of the burst are admitted and end with a final; the 5 others get 429 with
    Retry-After in well under the 1.5 s the admitted ones take; gauges return to 0 afterwards."""
    env = {"COINSERVE_MAX_CONCURRENT_REQUESTS": "3", "COINSERVE_MAX_OPEN_STREAMS": "2"}
    with running(coded_bundle, env=env, worker_env={name: SLOW for name in REPLICAS}) as service:
        url = f"{service.url}/v2/models/fashion/infer"

        def post(i: int) -> tuple[httpx.Response, float]:
            start = time.perf_counter()
            response = httpx.post(url, json=request_body(1, seed=i), timeout=30)
            return response, time.perf_counter() - start

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(post, range(8)))
        admitted = [(r, s) for r, s in results if r.status_code == 200]
        refused = [(r, s) for r, s in results if r.status_code == 429]
        assert len(admitted) == 3 and len(refused) == 5, [r.status_code for r, _ in results]
        for response, seconds in refused:
            assert response.headers["Retry-After"] == "1" and "retry" in response.json()["error"]
            assert seconds < 1.0  # refused at once, not queued behind the slow replicas
        for response, _ in admitted:
            assert response.json()["parameters"]["seq"] >= 1

        metrics = httpx.get(f"{service.url}/metrics", timeout=5).text
        assert "coinserve_inflight_requests 0.0" in metrics
        assert "coinserve_open_streams 0.0" in metrics


def test_streams_beyond_their_limit_get_429(coded_bundle):
    """Two slow streams are open; a third is refused with 429 while the first two end with a final."""
    env = {"COINSERVE_MAX_OPEN_STREAMS": "2"}
    with running(coded_bundle, env=env, worker_env={name: SLOW for name in REPLICAS}) as service:
        url = f"{service.url}/v2/models/fashion/infer"
        sse = {"Accept": "text/event-stream"}

        def stream(i: int) -> httpx.Response:
            return httpx.post(url, json=request_body(1, seed=i), headers=sse, timeout=30)

        with ThreadPoolExecutor(2) as pool:
            first = [pool.submit(stream, i) for i in range(2)]
            time.sleep(0.5)  # both streams are open and waiting on the replicas
            third = stream(2)
            assert third.status_code == 429 and third.headers["Retry-After"] == "1"
            for future in first:
                events = parse_sse(future.result().text)
                assert [e["event"] for e in events][-1] == "final"
