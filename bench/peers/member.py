"""One bundle member as the peers serve it: the same safetensors, the same float32 pass the coinserve
worker runs for a one-shot call (`RefinementEngine.float_forward` at the final resolution, int8 off),
the same thread and allocator settings (`models.runtime`). Imported inside the peers' own venvs, so
it needs only torch, numpy and safetensors from them and the project's `models`/`protocol` on the
path (bench/peers/venvs.py puts the project root there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.bitplanes import RefinementPlan
from models.bundle import open_bundle
from models.refine import RefinementEngine
from models.runtime import keep_freed_memory, use_all_cores

THREADS = 1  # the coinserve worker's default (workers/settings.py `threads`: replicas share the cores)


class Member:
    def __init__(self, bundle: str | Path, name: str, threads: int = THREADS) -> None:
        use_all_cores(threads)
        keep_freed_memory()
        opened = open_bundle(Path(bundle), verify=False)
        self.name = name
        self.shape = tuple(opened.spec.input.shape)
        plan = RefinementPlan.from_dict(opened.manifest.get("refinement"))
        self.engine = RefinementEngine(opened.build_model(name), plan, int8_engine=None)
        self.final = plan.resolutions - 1
        self(np.zeros((1, *self.shape), np.float32))  # warm-up

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (B, C) float32 of images (B, *input shape)."""
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32).reshape(-1, *self.shape))
        with torch.no_grad():
            return torch.softmax(self.engine.float_forward(x, self.final), dim=1).numpy()
