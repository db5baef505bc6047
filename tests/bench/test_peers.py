"""The peers' pieces that run without the peers' venvs: the member they serve is the worker's
float32 pass, and Triton's repository asks every member, with the extra instance where it says."""

from __future__ import annotations

import json

import numpy as np
import torch

from bench.peers.member import THREADS, Member
from bench.peers.triton_repo import write_repository
from models.bitplanes import RefinementPlan
from models.bundle import open_bundle
from models.refine import RefinementEngine
from workers.settings import WorkerSettings


def test_the_peers_member_is_the_workers_one_shot_pass(tiny_bundle_dir):
    assert THREADS == WorkerSettings.model_fields["threads"].default
    member = Member(tiny_bundle_dir, "member-1")
    bundle = open_bundle(tiny_bundle_dir)
    plan = RefinementPlan.from_dict(bundle.manifest.get("refinement"))
    sample = torch.rand(8, 1, 28, 28)
    engine = RefinementEngine(bundle.build_model("member-1"), plan, "auto", sample)  # as the worker builds it
    images = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    expected = torch.softmax(engine.forward(torch.from_numpy(images), plan.resolutions - 1), dim=1).numpy()
    np.testing.assert_array_equal(member(images), expected)
    assert torch.get_num_threads() == THREADS


def test_triton_repository_fans_out_to_every_member_with_one_extra_instance(tiny_bundle_dir, tmp_path):
    names = write_repository(tiny_bundle_dir, tmp_path, extra="member-0")
    manifest = json.loads((tiny_bundle_dir / "manifest.json").read_text())
    assert names == [m["name"] for m in manifest["members"]]
    for name in names:
        config = (tmp_path / name / "config.pbtxt").read_text()
        assert f"count: {2 if name == 'member-0' else 1} kind: KIND_CPU" in config
        assert "max_batch_size: 64" in config and "max_queue_delay_microseconds: 2000" in config
        assert (tmp_path / name / "1" / "model.py").exists()
    ensemble = (tmp_path / "fashion" / "config.pbtxt").read_text()
    assert ensemble.count("model_name:") == len(names)
    assert all(f'output_map {{ key: "probs" value: "{n}" }}' in ensemble for n in names)
