"""Graceful drain with real processes: SIGTERM fails readiness first, finishes what is in flight."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from tests.integration.conftest import call_worker, images_of, request_body, running, stream_in_background, with_plan

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


# uvicorn re-raises the captured SIGTERM once shutdown is complete, so a clean drain ends as
# 'killed by SIGTERM' (what Kubernetes expects); a crash would exit 1, a hang would time out.
CLEAN_EXIT = (0, -signal.SIGTERM)


def test_sigterm_fails_readiness_finishes_the_stream_then_exits(coded_bundle, tmp_path):
    """1. Serve a 9-resolution plan whose members take 300 ms per resolution: a stream lasts ~2.5 s.
    2. Start a stream; once its coarse event arrives, SIGTERM the gateway (drain 1 s).
    3. At once, readiness answers 503 while liveness still answers 200.
    Result: the stream still ends with exactly one final, new connections are refused after the
    drain, and the gateway exits cleanly well inside its grace period."""
    bundle = with_plan(coded_bundle, [1, 2, 3, 4, 5, 6, 7, 8], tmp_path)
    slow = {"COINSERVE_WORKER_FAULT_STEP_DELAY_MS": "300"}
    env = {name: slow for name in ("member-0", "member-1", "member-2", "coded-coin-0")}
    with running(bundle, worker_env=env, gateway_args=["--drain-s", "1"]) as service:
        gateway = service.child("gateway")
        stream = stream_in_background(service.url, request_body(1))
        assert stream.coarse.wait(10)
        gateway.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert httpx.get(f"{service.url}/v2/health/ready", timeout=5).status_code == 503
        assert httpx.get(f"{service.url}/v2/health/live", timeout=5).status_code == 200
        events = stream.join(30)
        time.sleep(1.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{service.url}/v2/health/live", timeout=2)
        assert gateway.process.wait(timeout=20) in CLEAN_EXIT
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "final" and kinds.count("final") == 1


def test_sigterm_on_a_worker_fails_its_readiness_first_and_keeps_answering(coded_bundle):
    """1. SIGTERM member-0, started with a 2 s drain.
    Result: its readiness answers 503 at once, it still answers calls on its channel during the
    drain, the gateway stops counting it as ready, and it exits cleanly."""
    with running(coded_bundle, worker_args={"member-0": ["--drain-s", "2"]}) as service:
        worker = service.child("member-0")
        worker.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert httpx.get(f"{worker.url}/v2/health/ready", timeout=5).status_code == 503
        answer = call_worker(worker, images_of(1), timeout_s=5)
        assert [a.final for a in answer.answers] == [True]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ready = httpx.get(f"{service.url}/v2/models/fashion", timeout=5).json()["parameters"]["replicas_ready"]
            if not ready["member-0"]:
                break
            time.sleep(0.1)
        assert ready["member-0"] is False and ready["member-1"] is True
        assert worker.process.wait(timeout=20) in CLEAN_EXIT
