"""The bundle's example inputs (`GET /v1/examples`): a few held-out inputs that `coinserve train` and
`coinserve import` store in `examples.safetensors`, each ready to send as a V2 request.

Read once at start-up with safetensors' numpy loader (the gateway never loads torch) and checked
against the manifest's sha256. A bundle without examples (one written before they existed), or with
an examples file that does not match its manifest, is still served: the list is empty and `note`
says why, because a demo file must never keep a model from serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from safetensors.numpy import load as load_numpy

from app.group import Group

logger = logging.getLogger(__name__)
MAX_EXAMPLES = 32


def _read(bundle: Path) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (N, *shape) float32, labels (N,) int64: -1 where unlabelled); raises ValueError."""
    manifest = json.loads((bundle / "manifest.json").read_bytes())
    entry = manifest.get("examples") if isinstance(manifest, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "sha256" not in entry:
        raise ValueError("the bundle has no example inputs (made before examples were stored: train or import again)")
    name = entry["file"]
    if Path(name).name != name:
        raise ValueError(f"examples file {name!r} must be a plain file name inside the bundle")
    data = (bundle / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{name} does not match its manifest sha256 (tampered or corrupt)")
    tensors = load_numpy(data)
    inputs = np.asarray(tensors["inputs"], dtype=np.float32)
    labels = np.asarray(tensors.get("labels", np.full(len(inputs), -1)), dtype=np.int64)
    return inputs[:MAX_EXAMPLES], labels[:MAX_EXAMPLES]


def examples_body(bundle: Path, group: Group) -> bytes:
    """The `/v1/examples` response, encoded once: the input contract, the labels and the examples."""
    spec = group.spec
    body: dict[str, Any] = {
        "model_name": group.name,
        "input": spec.input.to_dict(),
        "labels": list(spec.labels),
        "range": None,
    }
    try:
        body.update(_examples(bundle, group))
    except Exception as exc:  # a demo file never keeps the model from serving (module docstring)
        logger.warning("bundle %s: no examples for the console: %s", bundle, exc)
        return orjson.dumps({**body, "examples": [], "note": str(exc)})
    return orjson.dumps(body)


def _examples(bundle: Path, group: Group) -> dict[str, Any]:
    spec = group.spec
    inputs, labels = _read(bundle)
    if inputs.shape[1:] != spec.input.shape or labels.shape != (len(inputs),):
        raise ValueError(
            f"examples of shape {list(inputs.shape[1:])} with labels {list(labels.shape)}, "
            f"not the input's {list(spec.input.shape)} with one label each"
        )
    integer = not spec.input.datatype.startswith("FP")
    examples = [
        {
            "index": i,
            "label": int(label) if label >= 0 else None,
            "label_name": spec.label(int(label)) if 0 <= label < spec.classes else None,
            "inputs": [
                {
                    "name": spec.input.name,
                    "shape": [1, *spec.input.shape],
                    "datatype": spec.input.datatype,
                    "data": (np.rint(x).astype(np.int64) if integer else x).ravel().tolist(),
                }
            ],
        }
        for i, (x, label) in enumerate(zip(inputs, labels, strict=True))
    ]
    value_range = [float(inputs.min()), float(inputs.max())] if len(inputs) else None
    return {"examples": examples, "range": value_range}
