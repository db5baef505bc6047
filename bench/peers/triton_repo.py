"""Triton serving the bundle's k members: a model repository with one Python-backend model per member
(each instance its own stub process, running the same forward pass as coinserve's workers:
bench/peers/member.py) with dynamic batching, and an ensemble model `fashion` that sends the one
input to all k and returns every member's probabilities: the fan-out a Triton user writes without
client code. Run by bench/peers/bench.py with the `tritonserver` binary that `nvidia-pytriton`
ships, from the Triton venv (bench/peers/venvs.py).

Settings, and why: `max_batch_size` 64 with `dynamic_batching { max_queue_delay_microseconds: 2000 }`
(coinserve's worker: 64 rows, 2 ms); one CPU instance per member, two for the `extra` one (k + 1
model processes, as coinserve has with its coded replica; Triton spreads that model's batches over
both instances).
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_PY = """
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from bench.peers.member import Member

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.member = Member(params["bundle"], params["member"])

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, "input").as_numpy() for r in requests]
        sizes = [len(a) for a in arrays]
        probs = self.member(np.concatenate(arrays))
        out = []
        for part in np.split(probs, np.cumsum(sizes)[:-1]):
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("probs", part.astype(np.float32))]))
        return out
"""


def member_config(name: str, bundle: Path, instances: int, shape: list[int], classes: int) -> str:
    dims = ", ".join(str(d) for d in shape)
    return f"""name: "{name}"
backend: "python"
max_batch_size: 64
input [ {{ name: "input" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
output [ {{ name: "probs" data_type: TYPE_FP32 dims: [ {classes} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters: {{ key: "bundle" value: {{ string_value: "{bundle}" }} }}
parameters: {{ key: "member" value: {{ string_value: "{name}" }} }}
"""


def ensemble_config(names: list[str], shape: list[int], classes: int) -> str:
    dims = ", ".join(str(d) for d in shape)
    outputs = "\n".join(f'  {{ name: "{n}" data_type: TYPE_FP32 dims: [ {classes} ] }},' for n in names).rstrip(",")
    steps = "\n".join(
        f"""    {{ model_name: "{n}" model_version: -1
      input_map {{ key: "input" value: "input" }}
      output_map {{ key: "probs" value: "{n}" }} }},"""
        for n in names
    ).rstrip(",")
    return f"""name: "fashion"
platform: "ensemble"
max_batch_size: 64
input [ {{ name: "input" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
output [
{outputs}
]
ensemble_scheduling {{
  step [
{steps}
  ]
}}
"""


def write_repository(bundle: Path, out: Path, extra: str | None) -> list[str]:
    """The repository under `out`; returns the member names."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = [m["name"] for m in manifest["members"]]
    shape = list(manifest["input"]["shape"])
    classes = (
        int(manifest["output"]["classes"]) if "classes" in manifest["output"] else int(manifest["output"]["shape"][-1])
    )
    for name in names:
        folder = out / name / "1"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.py").write_text(MODEL_PY)
        instances = 2 if name == extra else 1
        (out / name / "config.pbtxt").write_text(member_config(name, bundle.resolve(), instances, shape, classes))
    (out / "fashion" / "1").mkdir(parents=True, exist_ok=True)
    (out / "fashion" / "config.pbtxt").write_text(ensemble_config(names, shape, classes))
    return names
