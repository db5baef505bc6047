"""Bundles of other shapes serve unmodified (issue 15): an MLP on 16 features with 5 labelled classes
and a CNN on 3×32×32 inputs, imported from state dicts, coded, then served by real processes:
metadata, JSON and binary infer, SSE refinement, and a SIGSTOPped member decoded."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from tests.integration.conftest import Running, parse_sse, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MLP = {
    "input": {"name": "features", "shape": [16], "datatype": "FP32"},
    "labels": ["ant", "bee", "cat", "dog", "eel"],
    "layers": [
        {"type": "Linear", "in_features": 16, "out_features": 32},
        {"type": "BatchNorm1d", "num_features": 32},
        {"type": "ReLU"},
        {"type": "Dropout", "p": 0.2},
        {"type": "Linear", "in_features": 32, "out_features": 5},
    ],
}
CNN = {
    "input": {"name": "image", "shape": [3, 32, 32], "datatype": "FP32"},
    "classes": 4,
    "layers": [
        {"type": "Conv2d", "in_channels": 3, "out_channels": 8, "kernel_size": 3, "stride": 1, "padding": 1},
        {"type": "BatchNorm2d", "num_features": 8},
        {"type": "ReLU"},
        {"type": "MaxPool2d", "kernel_size": 2},
        {"type": "Conv2d", "in_channels": 8, "out_channels": 8, "kernel_size": 3, "stride": 2, "padding": 1},
        {"type": "ReLU"},
        {"type": "AvgPool2d", "kernel_size": 2},
        {"type": "Flatten"},
        {"type": "Linear", "in_features": 128, "out_features": 4},
    ],
}


def make_user_files(spec: dict, folder: Path, k: int = 3) -> dict:
    """What a user brings: k variants of one network (a base plus small changes), the spec, and
    unlabelled calibration inputs; labels of the held-out set are the base's own answers."""
    import torch
    from safetensors.torch import save_file

    from models.layers import build_sequential, check_layers

    folder.mkdir(parents=True)
    layers = check_layers(spec["layers"])
    torch.manual_seed(0)
    base = build_sequential(layers).eval()
    shape = spec["input"]["shape"]
    rng = np.random.default_rng(0)
    calibration = rng.normal(0.5, 0.3, size=(96, *shape)).astype(np.float32)
    eval_x = rng.normal(0.5, 0.3, size=(64, *shape)).astype(np.float32)
    with torch.no_grad():
        eval_y = base(torch.from_numpy(eval_x)).argmax(1).numpy()
    members = []
    for i in range(k):
        member = build_sequential(layers).eval()
        member.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, tensor in member.state_dict().items():
                if tensor.is_floating_point() and not name.endswith("running_var"):
                    tensor.add_(0.05 * torch.randn_like(tensor))
        path = folder / f"member-{i}.safetensors"
        save_file(member.state_dict(), path)
        members.append(member)
    (folder / "spec.json").write_text(json.dumps(spec))
    for name, array in (("calibration", calibration), ("eval_x", eval_x), ("eval_y", eval_y)):
        np.save(folder / f"{name}.npy", array)
    return {"folder": folder, "members": members}


def import_and_code(user: dict, out: Path, name: str) -> Path:
    from app.cli import main

    folder = user["folder"]
    argv = ["import", "--out", str(out), "--spec", str(folder / "spec.json"), "--name", name]
    for i in range(len(user["members"])):
        argv += ["--member", f"member-{i}={folder / f'member-{i}.safetensors'}"]
    argv += [
        "--calibration",
        str(folder / "calibration.npy"),
        "--eval",
        str(folder / "eval_x.npy"),
        str(folder / "eval_y.npy"),
    ]
    assert main(argv) == 0
    assert main(["code", "--bundle", str(out), "--method", "average-distill", "--distill-steps", "20"]) == 0
    return out


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def own(request, tmp_path_factory) -> Iterator[tuple[str, dict, dict, Running]]:
    spec = MLP if request.param == "mlp" else CNN
    root = tmp_path_factory.mktemp(request.param)
    user = make_user_files(spec, root / "user")
    bundle = import_and_code(user, root / "bundle", request.param)
    with running(bundle, env={"COINSERVE_OVERLOAD_LAG_MS": "1000"}) as service:
        yield request.param, spec, user, service


def _body(spec: dict, x: np.ndarray, **parameters) -> dict:
    tensor = {"name": spec["input"]["name"], "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return {"inputs": [tensor], **({"parameters": parameters} if parameters else {})}


def _inputs(spec: dict, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.5, 0.3, size=(n, *spec["input"]["shape"])).astype(np.float32)


def _original(user: dict, i: int, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.softmax(user["members"][i](torch.from_numpy(x)), 1).numpy()


def test_metadata_shows_the_real_input_and_labels(own):
    group, spec, _, service = own
    meta = httpx.get(f"{service.url}/v2/models/{group}", timeout=10).json()
    assert meta["inputs"] == [{**spec["input"], "shape": [-1, *spec["input"]["shape"]]}]
    classes = len(spec.get("labels", [])) or spec["classes"]
    assert all(o["shape"] == [-1, classes] for o in meta["outputs"])
    assert meta["parameters"]["labels"] == spec.get("labels", [])
    worker = httpx.get(f"{service.child('member-0').url}/v2/models/member-0", timeout=10).json()
    assert worker["inputs"][0]["shape"] == [-1, *spec["input"]["shape"]]


def test_json_and_binary_infer_serve_the_users_own_models(own):
    from protocol.v2 import HEADER_LENGTH, encode_binary_request

    group, spec, user, service = own
    x = _inputs(spec, 3)
    for _ in range(5):  # a member late on a cold start is decoded (the patient policy): ask again
        reply = httpx.post(f"{service.url}/v2/models/{group}/infer", json=_body(spec, x), timeout=30)
        assert reply.status_code == 200, reply.text
        if not reply.json()["parameters"]["decoded_members"]:
            break
    assert reply.json()["parameters"]["decoded_members"] == []
    outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in reply.json()["outputs"]}
    for i in range(3):  # exactly the originals' probabilities: folding changed nothing
        np.testing.assert_allclose(outputs[f"member-{i}"], _original(user, i, x), atol=1e-5)
    body, length = encode_binary_request(x, {}, spec["input"]["name"])
    binary = httpx.post(
        f"{service.url}/v2/models/{group}/infer",
        content=body,
        headers={HEADER_LENGTH: str(length), "Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert binary.status_code == 200, binary.text
    data = orjson.loads(binary.content[: int(binary.headers.get(HEADER_LENGTH, len(binary.content)))])
    served = {o["name"]: o for o in data["outputs"]}
    np.testing.assert_allclose(np.array(served["member-0"]["data"]).reshape(3, -1), outputs["member-0"], atol=1e-6)
    wrong = httpx.post(f"{service.url}/v2/models/{group}/infer", json=_body(spec, x[:, :1]), timeout=30)
    assert wrong.status_code == 400 and "shape must be" in wrong.json()["error"]


def test_sse_refines_coarse_to_final(own):
    group, spec, _, service = own
    headers = {"Accept": "text/event-stream"}
    reply = httpx.post(
        f"{service.url}/v2/models/{group}/infer", json=_body(spec, _inputs(spec, 1)), headers=headers, timeout=30
    )
    events = [e["event"] for e in parse_sse(reply.text)]
    assert events[0] == "coarse" and events[-1] == "final" and events.count("final") == 1


def test_a_paused_member_is_decoded(own):
    group, spec, _, service = own
    service.signal("member-1", signal.SIGSTOP)
    try:
        reply = httpx.post(
            f"{service.url}/v2/models/{group}/infer", json=_body(spec, _inputs(spec, 2), deadline_ms=800), timeout=30
        )
    finally:
        service.signal("member-1", signal.SIGCONT)
    assert reply.status_code == 200, reply.text
    assert reply.json()["parameters"]["decoded_members"] == ["member-1"]
