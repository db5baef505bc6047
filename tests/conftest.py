"""Shared fixtures: a clean COINSERVE_* environment for every test, and the anyio backend."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _clean_coinserve_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("COINSERVE_"):
            monkeypatch.delenv(name)
    yield


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory: pytest.TempPathFactory):
    """A real but tiny bundle (k = 3, one epoch on 1500 images): seconds to train, shared read-only."""
    from models.train import TrainingConfig, train_bundle

    out = tmp_path_factory.mktemp("tiny-bundle")
    cfg = TrainingConfig(k=3, base_epochs=1, member_steps=10, batch_size=64, train_limit=1500, test_limit=500)
    train_bundle(out, cfg, log=lambda _msg: None)
    return out


@pytest.fixture
def tiny_bundle_copy(tiny_bundle_dir, tmp_path):
    """A private copy of the tiny bundle for tests that write into it."""
    import shutil

    return shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")


@pytest.fixture(scope="session")
def redis_server():
    """A real Redis (Debian's redis-server) on a free loopback port for the whole session."""
    from bench.redis_server import redis_server as start

    with start() as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session's Redis, emptied for this test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url
