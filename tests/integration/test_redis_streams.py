"""Many gateways, one stream (issue 19): two real gateways over the same real workers share request
event logs in a real Redis (Debian's redis-server on a free loopback port).

- POST on A, follow on B, resume on A with Last-Event-ID: nothing twice, nothing lost;
- SIGKILL of A mid-request: a reader on B gets exactly one `error` ("gateway lost") within lease + 1 s;
- Redis SIGSTOPped: new detached requests 503 + Retry-After, JSON and direct SSE calls go on;
  SIGCONT: detached requests work again, nothing restarted;
- Redis unreachable at start: readiness fails with the reason, and passes once Redis is there.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app import launcher
from bench.redis_server import RedisServer, redis_server
from tests.integration.conftest import Running, parse_sse, request_body, running, with_plan

LEASE_S = 1.0
SLOW = {"COINSERVE_WORKER_FAULT_STEP_DELAY_MS": "150"}  # 8 resolutions: a request lasts ~1 s


@dataclass
class Pair:
    service: Running  # the workers and gateway A
    b: launcher.Child  # gateway B over the same replicas
    redis_url: str

    @property
    def a(self) -> str:
        return self.service.url

    @property
    def b_url(self) -> str:
        return self.b.url


@contextmanager
def two_gateways(bundle: Path, redis_url: str, extra_env: dict[str, str] | None = None) -> Iterator[Pair]:
    """Workers and gateway A (`running`), then gateway B; `extra_env` goes to every process."""
    env = {"COINSERVE_STREAM_STORE": redis_url, "COINSERVE_STREAM_LEASE_S": str(LEASE_S), **(extra_env or {})}
    with running(bundle, env=env) as service:
        b = launcher.add_gateway(service.cluster, launcher.free_port())
        launcher.wait_ready(launcher.Cluster([b]), timeout_s=60)
        yield Pair(service, b, redis_url)


def post(url: str, parameters: dict | None = None, seed: int = 0) -> httpx.Response:
    return httpx.post(f"{url}/v1/requests", json=request_body(1, parameters, seed=seed), timeout=10)


def follow(url: str, request_id: str, after: int = 0, timeout: float = 30) -> list[dict]:
    headers = {"Last-Event-ID": str(after)} if after else {}
    with httpx.stream("GET", f"{url}/v1/requests/{request_id}/events", headers=headers, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        return parse_sse(r.read().decode())


@pytest.fixture(scope="module")
def slow_bundle(coded_bundle, tmp_path_factory) -> Path:
    return with_plan(coded_bundle, [1, 2, 3, 4, 5, 6, 7], tmp_path_factory.mktemp("redis-plan"))


@pytest.fixture(scope="module")
def slow_pair(slow_bundle, redis_server: RedisServer) -> Iterator[Pair]:
    """Two gateways over slow workers, shared by the next two tests: the second SIGKILLs gateway A."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    with two_gateways(slow_bundle, redis_server.url, SLOW) as pair:
        yield pair


def test_posted_on_one_gateway_followed_on_the_other_and_resumed_on_the_first(slow_pair):
    pair = slow_pair
    created = post(pair.a)
    assert created.status_code == 202, created.text
    request_id = created.json()["id"]
    on_b = follow(pair.b_url, request_id)
    ids = [e["id"] for e in on_b]
    assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 8  # coarse, refined ..., final
    assert [e["event"] for e in on_b][-1] == "final" and [e["event"] for e in on_b].count("final") == 1
    middle = ids[len(ids) // 2]
    resumed = follow(pair.a, request_id, after=middle)
    assert resumed == on_b[middle:]  # the rest, nothing twice, nothing lost, the same bytes
    for url in (pair.a, pair.b_url):  # complete: a reconnect at the end is told to stop
        done = httpx.get(f"{url}/v1/requests/{request_id}/events", headers={"Last-Event-ID": str(ids[-1])})
        assert done.status_code == 204
    # An id in use on one gateway is in use on the other.
    again = httpx.post(f"{pair.b_url}/v1/requests", json={**request_body(1), "id": request_id}, timeout=10)
    assert again.status_code == 400 and "already in use" in again.text
    ready = httpx.get(f"{pair.b_url}/v2/health/ready").json()
    assert ready["stream_store"] == {"url": pair.redis_url, "ok": True, "reason": "ok"}


def test_a_request_whose_gateway_is_killed_ends_with_one_error_on_the_other(slow_pair):
    pair = slow_pair
    request_id = post(pair.a).json()["id"]
    text, first = "", threading.Event()
    killed_at: list[float] = []
    got_error_at: list[float] = []

    def read() -> None:
        nonlocal text
        with httpx.stream("GET", f"{pair.b_url}/v1/requests/{request_id}/events", timeout=30) as r:
            for chunk in r.iter_text():
                text += chunk
                if "event: coarse" in text:
                    first.set()
                if "event: error" in text and not got_error_at:
                    got_error_at.append(time.monotonic())

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(10)
    pair.service.signal("gateway", signal.SIGKILL)
    killed_at.append(time.monotonic())
    reader.join(15)
    assert not reader.is_alive()
    events = parse_sse(text)
    kinds = [e["event"] for e in events]
    assert kinds.count("error") == 1 and kinds[-1] == "error" and "final" not in kinds, kinds
    assert events[-1]["data"] == {"error": "gateway lost"}
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert got_error_at[0] - killed_at[0] <= LEASE_S + 1.0
    # Read again, on B, from the start: the same log, still exactly one terminal event.
    assert follow(pair.b_url, request_id) == events


def test_a_ticket_from_one_gateway_follows_and_polls_on_the_other(coded_bundle, redis_server: RedisServer):
    """Gateways with the same auth token share one Redis: the `events_url` gateway A hands out works,
    without the token, on gateway B (issue 28: a browser EventSource behind a Service)."""
    token = "shared-token-3c1d9e"
    with two_gateways(coded_bundle, redis_server.url, {"COINSERVE_AUTH_TOKEN": token}) as pair:
        body = request_body(1)
        created = httpx.post(f"{pair.a}/v1/requests", json=body, headers={"Authorization": f"Bearer {token}"})
        assert created.status_code == 202, created.text
        request_id, events_url = created.json()["id"], created.json()["events_url"]
        assert "?ticket=" in events_url
        with httpx.stream("GET", pair.b_url + events_url, timeout=30) as r:
            assert r.status_code == 200, r.read()
            events = parse_sse(r.read().decode())
        assert [e["event"] for e in events][-1] == "final" and [e["event"] for e in events].count("final") == 1
        polled = httpx.get(pair.b_url + created.json()["poll_url"], timeout=10).json()
        assert polled["state"] == "final" and polled["answer"] == events[-1]["data"]
        assert httpx.get(f"{pair.b_url}/v1/requests/{request_id}/events", timeout=10).status_code == 401


def test_redis_paused_fails_only_detached_requests_and_they_come_back(coded_bundle, redis_server: RedisServer):
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    with two_gateways(coded_bundle, redis_server.url) as pair:
        assert post(pair.a).status_code == 202
        redis_server.pause()
        try:
            time.sleep(1.5)  # the gateways' store check (every 1 s) has failed by now
            for url in (pair.a, pair.b_url):
                started = time.monotonic()
                refused = post(url)
                assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
                assert "stream store" in refused.json()["error"]
                assert time.monotonic() - started < 1.5
                plain = httpx.post(f"{url}/v2/models/fashion/infer", json=request_body(2), timeout=10)
                assert plain.status_code == 200, plain.text
                headers = {"Accept": "text/event-stream"}
                sse = httpx.post(f"{url}/v2/models/fashion/infer", json=request_body(1), headers=headers, timeout=10)
                assert [e["event"] for e in parse_sse(sse.text)][-1] == "final"
                ready = httpx.get(f"{url}/v2/health/ready")  # still ready: the pods keep serving JSON and SSE
                assert ready.status_code == 200 and ready.json()["stream_store"]["ok"] is False
        finally:
            redis_server.resume()
        deadline = time.monotonic() + 5
        while (created := post(pair.b_url)).status_code != 202 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert created.status_code == 202, created.text
        assert [e["event"] for e in follow(pair.a, created.json()["id"])][-1] == "final"


def test_redis_unreachable_at_start_fails_readiness_with_the_reason_until_it_is_there(coded_bundle):
    port = launcher.free_port()
    url = f"redis://127.0.0.1:{port}/0"
    cluster = launcher.start(coded_bundle, launcher.free_port(), env={"COINSERVE_STREAM_STORE": url})
    gateway = next(c for c in cluster.children if c.name == "gateway")
    try:
        deadline = time.monotonic() + 60
        body: dict = {}
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"{gateway.url}/v2/health/ready", timeout=2)
                body = response.json()
                if response.status_code == 503 and not body.get("down") and "stream_store" in body:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert body.get("ready") is False, body
        assert f"stream store {url} unreachable" in body["error"]
        with redis_server(port=port):
            launcher.wait_ready(cluster, timeout_s=10)
            assert post(gateway.url).status_code == 202
    finally:
        cluster.stop()


def test_bench_many_requests_over_two_gateways_lose_nothing_and_repeat_nothing(coded_bundle):
    """The smoke run of bench/redis_streams.py (the must-reach run is 1,000 requests: docs/streams.md)."""
    from bench.redis_streams import measure

    summary = measure(coded_bundle, requests=40, concurrency=8, lease_s=LEASE_S)["summary"]
    assert summary["accepted"] == 40
    assert summary["lost_events"] == 0 and summary["duplicate_events"] == 0
    assert summary["streams_with_one_terminal_last"] == 40
    assert summary["resumes_matching_the_log"] == 40 and summary["resumes_with_the_right_status"] == 40
    assert {"0", "1", "2"} <= set(summary["cut_after_counts"])  # cut before the first event, and after some
    assert 0 < summary["resumed_after_the_terminal"] < 40  # some had read everything: their reconnect got 204


def test_bench_gateway_killed_under_load_every_accepted_request_ends_once_on_the_other(coded_bundle):
    """The smoke run of bench/redis_streams.py's `kill` scenario: 30 detached requests/s, each ~0.5 s."""
    from bench.redis_streams import kill_scenario

    summary = kill_scenario(coded_bundle, rate=30, kill_at_s=1.2, lease_s=LEASE_S, step_delay_ms=500)["summary"]
    assert summary["accepted"] >= 20 and summary["accepted_202_but_unknown_on_b"] == 0
    assert summary["with_exactly_one_terminal_last"] == summary["accepted"]
    assert summary["ended_gateway_lost"] > 0  # some were running when A died
    assert summary["within_lease_plus_1s"] == summary["ended_gateway_lost"]
