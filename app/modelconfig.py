"""The served group as Triton's model configuration extension describes a model (issue 28): what
`GET /v2/models/{m}/config` answers and gRPC `ModelConfig` carries, from the bundle's manifest and
the gateway's settings; our own facts (members, coded replicas, resolutions) under `parameters`."""

from __future__ import annotations

from typing import Any

import orjson

from app.group import Group

# How the group batches, said in words: Triton's `dynamic_batching` fields have no room for it.
BATCHING = (
    "the gateway does not batch: it sends each request to every replica at once; each worker batches "
    "the calls that arrive while its forward pass runs (workers/batcher.py), up to its --max-batch rows, "
    "and waits --max-wait-ms for company first (0 by default, the value reported in "
    "max_queue_delay_microseconds)"
)


def triton_datatype(datatype: str) -> str:
    """A V2 tensor datatype (`FP32`) as Triton's model configuration names it (`TYPE_FP32`)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_config(group: Group, max_batch: int, refinement: dict[str, Any] | None = None) -> dict[str, Any]:
    """Triton's `ModelConfig` as its HTTP extension renders it (gRPC parses the same dict).
    `max_batch` is the gateway's limit of images per request (`--max-batch`); `refinement` the live
    resolutions per replica as their workers measured them (app/status.py `refinement`)."""
    spec = group.spec
    output = {"data_type": "TYPE_FP32", "dims": [spec.classes], "label_filename": "", "is_shape_tensor": False}
    return {
        "name": group.name,
        "platform": "coinserve",
        "backend": "coinserve",
        "runtime": "",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": max_batch,
        "input": [
            {
                "name": spec.input.name,
                "data_type": triton_datatype(spec.input.datatype),
                "format": "FORMAT_NONE",
                "dims": list(spec.input.shape),
                "is_shape_tensor": False,
                "allow_ragged_batch": False,
                "optional": False,
            }
        ],
        "output": [{"name": name, **output} for name in group.outputs],
        "dynamic_batching": {
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": 0,
            "preserve_ordering": False,
        },
        "default_model_filename": "manifest.json",
        "parameters": {name: {"string_value": value} for name, value in _parameters(group, refinement).items()},
    }


def _parameters(group: Group, refinement: dict[str, Any] | None = None) -> dict[str, str]:
    """Our facts as Triton's string-valued parameters: lists and tables as JSON text."""
    meta = group.metadata()["parameters"]
    extra = {} if meta.get("input_range") is None else {"input_range": orjson.dumps(meta["input_range"]).decode()}
    if refinement is not None:  # per replica: live resolutions and cost ratios, measured (issue 31)
        extra["refinement"] = orjson.dumps(refinement).decode()
    return {
        "members": ",".join(group.members),
        "coded_replicas": orjson.dumps(meta["coded_replicas"]).decode(),
        "coefficients": orjson.dumps(meta["coefficients"]).decode(),
        "resolutions": orjson.dumps(meta["resolutions"]).decode(),
        "classes": str(group.classes),
        "labels": orjson.dumps(meta["labels"]).decode(),
        "manifest_sha256": group.manifest_sha256 or "",
        "dynamic_batching": BATCHING,
        **extra,  # [low, high] every input value must lie in, when the bundle bounds them
    }
