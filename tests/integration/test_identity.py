"""Replicas checked for identity (DESIGN §3, issue 12), with real processes on loopback.

1. Train bundle B like the tiny bundle A, but with seed 1, and code it the same way.
2. Start A's members except member-1, A's coded replica, B's member-1, and a gateway for bundle A
   whose member-1 URL points at B's worker (a rolling update caught half-way).
3. Ask the gateway for its readiness, then send requests.
Result: readiness names member-1 with the bundle sha256 mismatch; no request reaches B's worker;
every answer decodes member-1 from A's coded replica instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app import launcher
from bench.loadgen import metric_sum
from tests.integration.conftest import request_body

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
STRANGER = "member-1"  # the member whose URL points at bundle B's worker
FAST_HEALTH = {"COINSERVE_HEALTH_INTERVAL_S": "0.3", "COINSERVE_HEALTH_BACKOFF_MAX_S": "1"}


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bundle B: the tiny bundle's recipe with another seed, plus its COIN coded model."""

    from models.bundle import open_bundle
    from models.coded import Ingredients, build_coded, members_of, write_coded
    from models.data import load_split
    from models.train import TrainingConfig, train_bundle

    out = tmp_path_factory.mktemp("other-bundle")
    cfg = TrainingConfig(k=3, seed=1, base_epochs=1, member_steps=10, batch_size=64, train_limit=1500, test_limit=500)
    train_bundle(out, cfg, log=lambda _msg: None)
    bundle = open_bundle(out)
    test = load_split("test").head(100)
    ingredients = Ingredients(bundle, members_of(bundle), calibration_images=200)
    write_coded(bundle, build_coded(ingredients, "coin", 3, 1), test)
    return out


def _sha256(bundle: Path) -> str:
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


def _planes(bundle: Path) -> list[int]:
    return list(json.loads((bundle / "manifest.json").read_text())["refinement"]["planes"])


@dataclass
class Mixed:
    gateway: str
    stranger: str  # bundle B's worker
    reason: str  # what the gateway should say about it


def _worker(name: str, bundle: Path, env: dict[str, str]) -> launcher.Child:
    port, channel = launcher.free_port(), launcher.free_port()
    args = ["worker", "--bundle", str(bundle), "--model", name, "--port", str(port), "--channel-port", str(channel)]
    return launcher.spawn(name, port, args, env)


def _wait_for_readiness(url: str, expected: dict, timeout_s: float) -> dict:
    """Poll the gateway's readiness until it says `expected` (each replica checked at least once)."""
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    while time.monotonic() < deadline:
        try:
            body = httpx.get(f"{url}/v2/health/ready", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            body = {}
        if body == expected:
            break
        time.sleep(0.2)
    return body


@pytest.fixture(scope="module")
def mixed(coded_bundle: Path, other_bundle: Path) -> Iterator[Mixed]:
    members = [m["name"] for m in json.loads((coded_bundle / "manifest.json").read_text())["members"]]
    env = dict(os.environ)
    cluster = launcher.Cluster()
    try:  # every process starts at once: the gateway's health checks find the workers as they come up
        for name in [*members, "coded-coin-0"]:
            cluster.children.append(_worker(name, other_bundle if name == STRANGER else coded_bundle, env))
        port = launcher.free_port()
        replicas = [arg for c in cluster.children for arg in ("--replica", f"{c.name}={c.channel_url}")]
        gateway = ["gateway", "--bundle", str(coded_bundle), "--port", str(port), "--grpc-port", "0", *replicas]
        cluster.children.append(launcher.spawn("gateway", port, gateway, {**env, **FAST_HEALTH}))
        launcher.wait_ready(launcher.Cluster(cluster.children[:-1]), timeout_s=60)  # the workers
        ours, theirs = _sha256(coded_bundle), _sha256(other_bundle)
        reason = f"identity mismatch: bundle sha256 {theirs[:12]}… != {ours[:12]}… (the gateway's)"
        if _planes(other_bundle) != _planes(coded_bundle):  # each bundle's plan is chosen on its own validation
            reason += f"; refinement planes {_planes(other_bundle)} != {_planes(coded_bundle)} (the gateway's)"
        mixed = Mixed(f"http://127.0.0.1:{port}", cluster.children[members.index(STRANGER)].url, reason)
        _wait_for_readiness(mixed.gateway, _readiness(mixed), timeout_s=30)
        yield mixed
    finally:
        cluster.stop()


def _readiness(mixed: Mixed) -> dict:
    return {"ready": True, "down": [STRANGER], "reasons": {STRANGER: mixed.reason}}


def _warm(ready: dict) -> dict:
    """What the worker's warm-up measured (issue 29): a batch-1 time per resolution of its model."""
    assert list(ready["warm_up"]) == [STRANGER] and all(ms > 0 for ms in ready["warm_up"][STRANGER]["batch_1_ms"])
    return {"warm_up": ready["warm_up"]}


def _requests_served(url: str) -> float:
    return metric_sum(url, "coinserve_worker_requests_total")


def test_readiness_names_the_replica_of_another_bundle_and_why(mixed: Mixed):
    response = httpx.get(f"{mixed.gateway}/v2/health/ready", timeout=5)
    assert (response.status_code, response.json()) == (200, _readiness(mixed))
    metrics = httpx.get(f"{mixed.gateway}/metrics", timeout=5).text
    assert f'coinserve_replica_identity_mismatch_total{{replica="{STRANGER}"}}' in metrics


def test_a_worker_reports_its_identity_when_ready_and_in_its_metadata(mixed: Mixed, other_bundle: Path):
    identity = {"bundle_sha256": _sha256(other_bundle), "model": STRANGER, "refinement": _planes(other_bundle)}
    ready = httpx.get(f"{mixed.stranger}/v2/health/ready", timeout=5).json()
    assert ready == {"ready": True, "identity": identity, "channel_port": ready["channel_port"], **_warm(ready)}
    metadata = httpx.get(f"{mixed.stranger}/v2/models/{STRANGER}", timeout=5).json()
    assert metadata["parameters"]["identity"] == identity


def test_requests_decode_the_member_without_calling_the_replica_of_another_bundle(mixed: Mixed):
    before = _requests_served(mixed.stranger)
    for seed in range(5):
        response = httpx.post(f"{mixed.gateway}/v2/models/fashion/infer", json=request_body(1, seed=seed), timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["parameters"]["decoded_members"] == [STRANGER]
    assert _requests_served(mixed.stranger) == before == 0
