"""`coinserve train`: a base model, k members fine-tuned from it, the refinement plan chosen on
validation, all written as a bundle. The loop itself lives in models/fitting.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.bitplanes import RefinementPlan
from models.bundle import save_model, save_tensors, write_manifest
from models.data import (
    CLASSES,
    IMAGE_SHAPE,
    PIXEL_SCALE,
    VALIDATION_SIZE,
    Split,
    class_histogram,
    dirichlet_shards,
    load_split,
    train_validation,
)
from models.evaluate import accuracy, disagreement_matrix
from models.fitting import PRESETS, TrainingConfig, finetune_member, fit, model_config, preset, train_base
from models.layers import describe
from models.networks import CNNConfig, MLPConfig, build, config_to_dict, predict_proba
from models.runtime import use_all_cores
from models.selection import RECIPE_CANDIDATES, choose_plan, choose_recipe, recipe_rows
from models.sources import EXAMPLES_FILE
from protocol.spec import FORMAT

__all__ = ["PRESETS", "TrainingConfig", "finetune_member", "fit", "model_config", "preset", "train_bundle"]

GROUP = "fashion"  # the group name `coinserve train`'s bundles are served under
EXAMPLES = 8  # test images kept in the bundle as examples (the console, `up`'s curl)


class Stopwatch:
    """Wall-clock seconds per named phase, for the manifest's training figures."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def time(self, phase: str) -> _Phase:
        return _Phase(self, phase)


class _Phase:
    def __init__(self, watch: Stopwatch, phase: str) -> None:
        self.watch, self.phase = watch, phase

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.start
        self.watch.seconds[self.phase] = round(self.watch.seconds.get(self.phase, 0.0) + elapsed, 3)


def train_bundle(
    out: Path, cfg: TrainingConfig, log: Callable[[str], None] = print, choose_recipe: bool = False
) -> dict[str, Any]:
    """Train the base and k members, evaluate them on the test split, and write the bundle at `out`.

    Returns the manifest. The test split is used only for the reported figures, never for choices:
    the served refinement plan, and with `choose_recipe` the members' shard skew, learning rate and
    steps (models/selection.py), are chosen on the validation split.
    """
    threads = use_all_cores()
    watch = Stopwatch()
    with watch.time("load_data"):
        train, validation = train_validation(load_split("train"))
        test = load_split("test")
        if cfg.train_limit:
            train = train.head(cfg.train_limit)
        if cfg.test_limit:
            test = test.head(cfg.test_limit)
    model_cfg = model_config(cfg)
    torch.manual_seed(cfg.seed)
    base = build(cfg.architecture, model_cfg)
    log(f"training the base {cfg.architecture} on {len(train)} images ({cfg.base_epochs} epochs, {threads} threads)")
    with watch.time("base"):
        train_base(base, train, cfg)
    test_x = torch.from_numpy(test.images)
    base_probs = predict_proba(base, test_x).numpy()
    log(f"base test accuracy {accuracy(base_probs, test.labels):.4f}")
    recipe_choice = None
    if choose_recipe:
        with watch.time("recipe"):
            cfg, recipe_choice = _chosen_recipe(base, train, validation, cfg, log)

    shards = dirichlet_shards(train.labels, cfg.k, cfg.alpha, seed=cfg.seed)
    members, member_probs = [], []
    for i, index in enumerate(shards):
        with watch.time("members"):
            member = finetune_member(base, train.subset(index), cfg, i)
        members.append(member)
        member_probs.append(predict_proba(member, test_x).numpy())
        log(f"member-{i}: {len(index)} shard images, test accuracy {accuracy(member_probs[-1], test.labels):.4f}")

    plan_split = validation.head(cfg.test_limit) if cfg.test_limit else validation  # smoke runs: fewer images
    with watch.time("plan"):
        plan, ladder = _served_plan(members[0], plan_split)
    log(f"refinement plan chosen on validation: planes {list(plan.planes)} then float32")
    out.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(cfg, model_cfg, base, base_probs, members, member_probs, shards, train, test, out)
    manifest["refinement"] = plan.to_dict()
    manifest["refinement_choice"] = {"split": "validation", "images": len(plan_split), "ladder": ladder}
    if recipe_choice is not None:
        manifest["training"]["recipe_choice"] = {"split": "validation", "rows": recipe_choice}
    manifest["training"]["seconds"] = watch.seconds
    manifest["training"]["torch_threads"] = threads
    write_manifest(out, manifest)
    return manifest


def _chosen_recipe(
    base: nn.Module, train: Split, validation: Split, cfg: TrainingConfig, log: Callable[[str], None]
) -> tuple[TrainingConfig, list[dict[str, Any]]]:

    candidates = [
        replace(c, k=cfg.k, seed=cfg.seed, batch_size=cfg.batch_size, architecture=cfg.architecture)
        for c in RECIPE_CANDIDATES
    ]
    rows = recipe_rows(base, train, validation, candidates, log)
    chosen = choose_recipe(rows, cfg)
    log(f"recipe chosen on validation: alpha {chosen.alpha}, lr {chosen.member_lr}, {chosen.member_steps} steps")
    return chosen, rows


def _served_plan(member: nn.Module, validation: Split) -> tuple[RefinementPlan, list[dict[str, Any]]]:
    """The served refinement plan, chosen on validation images of member-0 (models/selection.py)."""

    return choose_plan(member, validation)


def _manifest(
    cfg: TrainingConfig,
    model_cfg: CNNConfig | MLPConfig,
    base: nn.Module,
    base_probs: np.ndarray,
    members: list[nn.Module],
    member_probs: list[np.ndarray],
    shards: list[np.ndarray],
    train: Split,
    test: Split,
    out: Path,
) -> dict[str, Any]:
    member_entries = []
    for i, (member, probs, index) in enumerate(zip(members, member_probs, shards, strict=True)):
        name = f"member-{i}"
        shard = {"size": len(index), "class_counts": class_histogram(train.labels[index]), "alpha": cfg.alpha}
        member_entries.append(
            {
                "name": name,
                **save_model(out, name, member),
                "shard": shard,
                "test_accuracy": accuracy(probs, test.labels),
            }
        )
    base_accuracy = accuracy(base_probs, test.labels)
    examples = test.head(EXAMPLES)
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "name": GROUP,
        # pixels scaled to [0, 1] (models/data.py holds them in [0, 1)); the gateway refuses values outside it
        "input": {"name": "input", "shape": list(IMAGE_SHAPE), "datatype": "FP32", "range": [0.0, 1.0]},
        "output": {"classes": len(CLASSES), "labels": list(CLASSES)},
        "layers": describe(base),  # type: ignore[arg-type]  # our networks are nn.Sequential
        "examples": {
            **save_tensors(out, EXAMPLES_FILE, {"inputs": examples.images, "labels": examples.labels}),
            "count": len(examples),
            "split": "test",
        },
        "dataset": {
            "name": "fashion-mnist",
            "classes": list(CLASSES),
            "input_shape": list(IMAGE_SHAPE),
            "pixel_scale": PIXEL_SCALE,
            "train_size": len(train),
            "validation": {"size": VALIDATION_SIZE, "seed": 0},
            "test_size": len(test),
        },
        "architecture": cfg.architecture,
        "config": config_to_dict(model_cfg),
        "training": {k: v for k, v in asdict(cfg).items() if k != "architecture"},
        "base": {"name": "base", **save_model(out, "base", base), "test_accuracy": base_accuracy},
        "members": member_entries,
        "coded": [],
        "refinement": RefinementPlan().to_dict(),
        "base_test_accuracy": base_accuracy,
        "pairwise_disagreement": disagreement_matrix([p.argmax(axis=1) for p in member_probs]),
    }
