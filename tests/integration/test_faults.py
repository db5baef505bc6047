"""The fault suite, with real processes on loopback and real signals: whatever a replica does,
every accepted request ends with exactly one `final` or one `error`, within its deadline plus slack.

Members run in a k = 3 group with one COIN coded replica (coded-coin-0), so one missing member can
be decoded. Faults come from SIGKILL/SIGSTOP, or from the workers' fault knobs (COINSERVE_WORKER_FAULT_*).
"""

from __future__ import annotations

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app import launcher
from bench.loadgen import metric_sum
from tests.integration.conftest import parse_sse, request_body, running, stream_in_background, with_plan

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
SSE = {"Accept": "text/event-stream"}
SLACK_MS = 400  # scheduling slack on 2 shared cores; a hang would blow through it by seconds
FAST_HEALTH = {"COINSERVE_HEALTH_INTERVAL_S": "0.3", "COINSERVE_HEALTH_BACKOFF_MAX_S": "1"}


def call(url: str, body: dict, stream: bool) -> tuple[int, list[dict], float]:
    """(HTTP status, terminal-bearing events, elapsed ms): a JSON reply becomes one pseudo-event."""
    start = time.perf_counter()
    response = httpx.post(f"{url}/v2/models/fashion/infer", json=body, headers=SSE if stream else None, timeout=60)
    elapsed = (time.perf_counter() - start) * 1000
    if stream:
        return response.status_code, parse_sse(response.text), elapsed
    data = response.json()
    return response.status_code, [{"event": "error" if "error" in data else "final", "data": data}], elapsed


def terminal(events: list[dict]) -> dict:
    """Exactly one final or error, and it is the last event."""
    kinds = [e["event"] for e in events]
    assert kinds.count("final") + kinds.count("error") == 1, kinds
    assert kinds[-1] in ("final", "error"), kinds
    return events[-1]


metric = metric_sum


def test_member_killed_mid_stream_is_decoded_and_later_requests_skip_it(coded_bundle, tmp_path):
    """1. A 9-resolution plan at 200 ms per resolution: a stream lasts ~1.6 s.
    2. Start a stream (deadline 5000 ms); once its coarse event arrives, SIGKILL member-1.
    3. Send 6 more requests, JSON and SSE, with deadlines.
    Result: the stream ends with one final whose member-1 answer is decoded; every later request
    ends with one final, member-1 decoded, and the gateway stops calling the dead replica (its
    connection errors stop growing once the circuit is open)."""
    bundle = with_plan(coded_bundle, [1, 2, 3, 4, 5, 6, 7, 8], tmp_path)
    slow = {"COINSERVE_WORKER_FAULT_STEP_DELAY_MS": "200"}
    env = {name: slow for name in ("member-0", "member-1", "member-2", "coded-coin-0")}
    with running(bundle, worker_env=env, env=FAST_HEALTH) as service:
        start = time.perf_counter()
        stream = stream_in_background(service.url, request_body(1, {"deadline_ms": 5000}))
        assert stream.coarse.wait(10)
        service.signal("member-1", signal.SIGKILL)
        events = stream.join(30)
        elapsed = (time.perf_counter() - start) * 1000
        last = terminal(events)
        assert last["event"] == "final" and elapsed < 5000 + SLACK_MS
        assert last["data"]["parameters"]["decoded_members"] == ["member-1"]

        errors = []
        for i in range(6):
            status, later, elapsed = call(service.url, request_body(1, {"deadline_ms": 4000}), stream=i % 2 == 1)
            end = terminal(later)
            assert status == 200 and end["event"] == "final" and elapsed < 4000 + SLACK_MS
            assert end["data"]["parameters"]["decoded_members"] == ["member-1"]
            errors.append(metric(service.url, "coinserve_replica_errors_total", replica="member-1"))
        assert errors[-1] == errors[1]  # the circuit is open: no more calls to a port nobody listens on


@pytest.mark.parametrize(
    "fault",
    [
        {"COINSERVE_WORKER_FAULT_ERROR_RATE": "1"},
        {"COINSERVE_WORKER_FAULT_GARBAGE_RATE": "1", "COINSERVE_WORKER_FAULT_GARBAGE_KIND": "nan"},
        {"COINSERVE_WORKER_FAULT_GARBAGE_RATE": "1", "COINSERVE_WORKER_FAULT_GARBAGE_KIND": "shape"},
        {"COINSERVE_WORKER_FAULT_GARBAGE_RATE": "1", "COINSERVE_WORKER_FAULT_GARBAGE_KIND": "truncated"},
        {"COINSERVE_WORKER_FAULT_GARBAGE_RATE": "1", "COINSERVE_WORKER_FAULT_GARBAGE_KIND": "close"},
    ],
    ids=["http-500", "nan", "wrong-shape", "truncated-json", "closes-connection"],
)
def test_a_member_that_answers_wrongly_is_decoded_never_passed_on(coded_bundle, fault):
    """1. member-1 answers every call wrongly: HTTP 500, NaN probabilities, the wrong shape,
       truncated JSON, or a closed connection.
    2. Send JSON and SSE requests, with and without a deadline.
    Result: each ends with one final; member-1's answer is decoded from the coded replica (never the
    garbage), every probability is finite, and the gateway counts member-1's errors."""
    with running(coded_bundle, worker_env={"member-1": fault}) as service:
        for stream in (False, True):
            for parameters in ({}, {"deadline_ms": 3000}):
                status, events, elapsed = call(service.url, request_body(2, parameters), stream)
                end = terminal(events)
                assert status == 200 and end["event"] == "final", end
                assert end["data"]["parameters"]["decoded_members"] == ["member-1"]
                for output in end["data"]["outputs"]:
                    assert all(0 <= p <= 1 for p in output["data"]), output["name"]
                assert elapsed < 3000 + SLACK_MS
        # a final may come before member-1's bad reply does (k of k + 1 suffice), so not one per request
        assert metric(service.url, "coinserve_replica_errors_total", replica="member-1") >= 1


def test_member_paused_beyond_the_deadline_under_concurrent_load(service):
    """1. SIGSTOP member-0 for 2.5 s, three times the deadline.
    2. Meanwhile 24 concurrent requests (JSON and SSE, deadline_ms 800).
    Result: every one ends with exactly one final (member-0 decoded) within 800 ms plus slack."""
    service.signal("member-0", signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(
                pool.map(
                    lambda i: call(service.url, request_body(1, {"deadline_ms": 800}, seed=i), i % 2 == 0), range(24)
                )
            )
    finally:
        service.signal("member-0", signal.SIGCONT)
    for status, events, elapsed in results:
        end = terminal(events)
        assert status == 200 and end["event"] == "final", (status, end)
        assert end["data"]["parameters"]["decoded_members"] == ["member-0"]
        assert elapsed < 800 + SLACK_MS


def test_coded_replica_down_changes_nothing_for_healthy_members(coded_bundle):
    """1. SIGKILL the coded replica.
    Result: requests still end with one exact final (no member decoded, not approximate); the
    gateway's readiness stays 200 because every member is up."""
    with running(coded_bundle, env=FAST_HEALTH) as service:
        service.signal("coded-coin-0", signal.SIGKILL)
        for stream in (False, True):
            status, events, _ = call(service.url, request_body(1, {"deadline_ms": 3000}), stream)
            end = terminal(events)
            assert status == 200 and end["event"] == "final"
            assert end["data"]["parameters"]["approximate"] is False
        ready = httpx.get(f"{service.url}/v2/health/ready", timeout=5)
        assert ready.status_code == 200 and set(ready.json()["down"]) <= {"coded-coin-0"}


def test_every_replica_down_answers_503_quickly_with_retry_after(coded_bundle):
    """1. SIGKILL every replica.
    2. Send JSON and SSE requests without a deadline (the upstream timeout is 30 s).
    Result: a 503 JSON error naming the missing members with Retry-After, or one SSE error event,
    in well under a second each, not after a time-out; readiness answers 503."""
    with running(coded_bundle, env=FAST_HEALTH) as service:
        for name in ("member-0", "member-1", "member-2", "coded-coin-0"):
            service.signal(name, signal.SIGKILL)
        for _ in range(3):
            start = time.perf_counter()
            response = httpx.post(f"{service.url}/v2/models/fashion/infer", json=request_body(1), timeout=60)
            assert (time.perf_counter() - start) < 5  # a hang would take the 30 s upstream timeout
            assert response.status_code == 503 and "Retry-After" in response.headers
            assert re.search(r"member-\d", response.json()["error"])
            status, events, elapsed = call(service.url, request_body(1), stream=True)
            assert terminal(events)["event"] == "error" and elapsed < 5000
        time.sleep(1)
        assert httpx.get(f"{service.url}/v2/health/ready", timeout=5).status_code == 503


def test_a_replica_that_comes_back_is_used_again(coded_bundle):
    """1. SIGKILL member-2; requests are answered with member-2 decoded.
    2. Start a new member-2 worker on the same port.
    Result: within a few health re-checks (backoff capped at 1 s here) the gateway marks it ready
    and the next requests carry member-2's real answer again (not decoded, exact)."""
    with running(coded_bundle, env=FAST_HEALTH) as service:
        child = service.child("member-2")
        service.signal("member-2", signal.SIGKILL)
        child.process.wait()
        _, events, _ = call(service.url, request_body(1), stream=False)
        assert terminal(events)["data"]["parameters"]["decoded_members"] == ["member-2"]
        service.cluster.children[service.cluster.children.index(child)] = launcher.respawn(child)
        deadline = time.monotonic() + 60
        decoded = ["member-2"]
        while decoded and time.monotonic() < deadline:
            time.sleep(0.3)
            _, events, _ = call(service.url, request_body(1), stream=False)
            decoded = terminal(events)["data"]["parameters"]["decoded_members"]
        assert decoded == []
        assert terminal(events)["data"]["parameters"]["exact_members"] == ["member-0", "member-1", "member-2"]
