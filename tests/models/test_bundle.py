from __future__ import annotations

import json

import pytest
import torch

from models.bundle import FORMAT, FORMAT_V1, open_bundle, save_model, write_manifest
from models.errors import BundleError, BundleHashError
from models.layers import describe
from models.networks import MLPConfig, build_mlp, config_to_dict


@pytest.fixture(params=["v2", "v1"])
def bundle_dir(tmp_path, request):
    """A two-member bundle; v1: the manifest of `coinserve train` before layer lists (it still loads)."""
    cfg = MLPConfig(hidden=(8,))
    torch.manual_seed(0)
    members = [build_mlp(cfg) for _ in range(2)]
    entries = [{"name": f"member-{i}", **save_model(tmp_path, f"member-{i}", m)} for i, m in enumerate(members)]
    if request.param == "v1":
        contract = {
            "format": FORMAT_V1,
            "architecture": "mlp",
            "config": config_to_dict(cfg),
            "dataset": {"name": "fashion-mnist", "classes": list("abcdefghij"), "input_shape": [1, 28, 28]},
        }
    else:
        contract = {
            "format": FORMAT,
            "name": "g",
            "input": {"name": "input", "shape": [1, 28, 28], "datatype": "FP32"},
            "output": {"classes": 10},
            "layers": describe(members[0]),
        }
    write_manifest(tmp_path, {**contract, "members": entries, "coded": []})
    return tmp_path, members


def test_round_trip_gives_the_same_outputs(bundle_dir):
    folder, members = bundle_dir
    bundle = open_bundle(folder)
    x = torch.rand(3, 1, 28, 28)
    for i, member in enumerate(members):
        loaded = bundle.build_model(f"member-{i}")
        assert torch.equal(loaded(x), member.eval()(x))
    assert bundle.member_names == ["member-0", "member-1"]


def test_tampered_file_is_refused(bundle_dir):
    folder, _ = bundle_dir
    path = folder / "member-1.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleHashError, match="member-1.safetensors does not match its manifest sha256"):
        open_bundle(folder)


def test_tampered_file_is_refused_even_without_upfront_verification(bundle_dir):
    folder, _ = bundle_dir
    (folder / "member-0.safetensors").write_bytes(b"evil")
    bundle = open_bundle(folder, verify=False)
    with pytest.raises(BundleHashError):
        bundle.build_model("member-0")


def test_missing_manifest_names_the_fix(tmp_path):
    with pytest.raises(BundleError, match="coinserve train"):
        open_bundle(tmp_path)


def test_manifest_with_path_traversal_is_refused(bundle_dir):
    folder, _ = bundle_dir
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["members"][0]["file"] = "../outside.safetensors"
    write_manifest(folder, manifest)
    with pytest.raises(BundleError, match="plain file name"):
        open_bundle(folder)


def test_unknown_model_name_lists_the_known_ones(bundle_dir):
    folder, _ = bundle_dir
    with pytest.raises(BundleError, match="has: member-0, member-1"):
        open_bundle(folder).entry("member-9")


def test_wrong_format_is_refused(bundle_dir):
    folder, _ = bundle_dir
    (folder / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BundleError, match="not a manifest of coinserve-bundle/1 or coinserve-bundle/2"):
        open_bundle(folder)
