"""The README's "Serve your own models" flow, run as written (issue 15): the digits example's plain
PyTorch script, `coinserve import` (state dicts, and separately ONNX), `coinserve code`,
`coinserve up` and a curl; then a SIGSTOPped member of that bundle is decoded."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from app import launcher
from tests.integration.conftest import running
from tests.integration.test_readme import example

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "digits" / "train_members.py"


def test_the_example_script_is_plain_pytorch():
    tree = ast.parse(SCRIPT.read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
        if not isinstance(node, ast.ImportFrom) or node.module
    }
    assert imported.isdisjoint({"app", "models", "workers", "protocol", "coinserve"}), imported


def _bash(code: str, cwd: Path, timeout: float) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    log = cwd / "bash.log"
    with log.open("w") as stderr:  # a file, not a pipe: a background child cannot hold the run open
        out = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=timeout,
        )
    assert out.returncode == 0, out.stdout[-3000:] + log.read_text()[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def flow(tmp_path_factory) -> tuple[Path, str]:
    """The README block run in a fresh folder; `up` on a free port, stopped with SIGTERM at the end."""
    cwd = tmp_path_factory.mktemp("digits")
    port = launcher.free_port()
    code = example("own-models")
    code = code.replace("examples/digits/train_members.py", str(SCRIPT)).replace("localhost:8000", f"127.0.0.1:{port}")
    code = code.replace(
        "coinserve up --bundle bundles/digits &", f"coinserve up --bundle bundles/digits --port {port} --grpc-port 0 &"
    )
    assert f"--port {port}" in code
    # SIGTERM stops `up` and every process it started (exit 0 once up, 130 while still starting);
    # a died `up` ends the wait loop
    code = code.replace("; do sleep 0.5; done", "; do kill -0 %1; sleep 0.5; done")
    stdout = _bash(code + "\nkill -TERM %1\nwait %1 || [ $? -ge 128 ]\n", cwd, timeout=240)
    return cwd, stdout


def test_the_readme_flow_answers_with_the_bundles_labels(flow):
    cwd, stdout = flow
    answer = json.loads(next(line for line in stdout.splitlines() if line.startswith('{"model_name"')))
    assert answer["model_name"] == "digits"
    assert [o["name"] for o in answer["outputs"]] == ["member-0", "member-1", "member-2", "ensemble"]
    assert all(o["shape"] == [1, 10] for o in answer["outputs"])
    request = json.loads((cwd / "bundles/digits/example-request.json").read_text())
    assert request["inputs"][0]["name"] == "pixels" and request["inputs"][0]["shape"] == [1, 1, 8, 8]
    ensemble = np.array(answer["outputs"][-1]["data"])
    assert int(ensemble.argmax()) == 0  # the first held-out digit is a 0 ("labelled '0'" in up's banner)


def _originals(cwd: Path, x):
    """The PyTorch originals: each member's state dict in the spec's nn.Sequential, in eval mode."""
    import torch
    from safetensors.torch import load_file

    from models.layers import build_sequential, check_layers

    layers = check_layers(json.loads((cwd / "digits-out/spec.json").read_text())["layers"])
    out = []
    for i in range(3):
        model = build_sequential(layers)
        model.load_state_dict(load_file(cwd / f"digits-out/members/member-{i}.safetensors"))
        with torch.no_grad():
            out.append(torch.softmax(model.eval()(x), 1))
    return out


def test_onnx_imported_members_give_the_originals_probabilities(flow):
    import torch

    from models.bundle import open_bundle

    cwd, _ = flow
    _bash(example("own-models-onnx"), cwd, timeout=120)
    x = torch.from_numpy(np.load(cwd / "digits-out/eval_x.npy"))
    originals = _originals(cwd, x)
    for path in ("bundles/digits-onnx", "bundles/digits"):
        bundle = open_bundle(cwd / path)
        assert bundle.spec.labels == tuple(str(d) for d in range(10))
        for i, want in enumerate(originals):
            with torch.no_grad():
                got = torch.softmax(bundle.build_model(f"member-{i}")(x), 1)
            assert float((got - want).abs().max()) <= 1e-5, (path, i)


def test_a_paused_digits_member_is_decoded(flow):
    cwd, _ = flow
    body = json.loads((cwd / "bundles/digits/example-request.json").read_text())
    body["parameters"] = {"deadline_ms": 800}
    with running(cwd / "bundles/digits", env={"COINSERVE_OVERLOAD_LAG_MS": "1000"}) as service:
        service.signal("member-0", signal.SIGSTOP)
        try:
            reply = httpx.post(f"{service.url}/v2/models/digits/infer", json=body, timeout=30)
        finally:
            service.signal("member-0", signal.SIGCONT)
    assert reply.status_code == 200, reply.text
    assert reply.json()["parameters"]["decoded_members"] == ["member-0"]
    ensemble = next(o for o in reply.json()["outputs"] if o["name"] == "ensemble")
    assert int(np.argmax(ensemble["data"])) == 0
