from __future__ import annotations

import json

import numpy as np
import pytest

from models.bundle import open_bundle
from models.train import TrainingConfig, train_bundle


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    cfg = TrainingConfig(k=2, base_epochs=1, member_steps=5, batch_size=64, train_limit=1500, test_limit=300)
    manifest = train_bundle(out, cfg, log=lambda _msg: None)
    return out, manifest


def test_training_writes_a_verified_bundle(tiny_bundle):
    out, manifest = tiny_bundle
    bundle = open_bundle(out)  # verifies every sha256
    assert bundle.member_names == ["member-0", "member-1"]
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert sorted(p.name for p in out.iterdir()) == [
        "base.safetensors",
        "examples.safetensors",
        "manifest.json",
        "member-0.safetensors",
        "member-1.safetensors",
    ]


def test_manifest_records_the_training_figures(tiny_bundle):
    _, manifest = tiny_bundle
    assert 0.0 <= manifest["base_test_accuracy"] <= 1.0
    assert manifest["base_test_accuracy"] > 0.3  # one epoch on 1500 images learns something
    matrix = np.array(manifest["pairwise_disagreement"])
    assert matrix.shape == (2, 2) and np.all(np.diag(matrix) == 0) and np.allclose(matrix, matrix.T)
    for member in manifest["members"]:
        assert 0.0 <= member["test_accuracy"] <= 1.0
        assert sum(member["shard"]["class_counts"]) == member["shard"]["size"]
    assert sum(m["shard"]["size"] for m in manifest["members"]) == 1500
    assert set(manifest["training"]["seconds"]) == {"load_data", "base", "members", "plan"}


def test_members_start_from_the_base_and_drift(tiny_bundle):
    out, _ = tiny_bundle
    bundle = open_bundle(out)
    base, member = bundle.load_state("base"), bundle.load_state("member-0")
    drift = sum(float((member[k] - base[k]).abs().sum()) for k in base)
    scale = sum(float(base[k].abs().sum()) for k in base)
    assert 0.0 < drift < 0.2 * scale
