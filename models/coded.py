"""Building coded models of any method (coin, average, parity) for a set of members.

Used by `coinserve code` (coded models written into a bundle, for serving) and by the offline
evaluation (coded models for the first k members, kept in memory).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from models.bundle import Bundle, save_model
from models.coding import coefficients, condition_numbers
from models.coin import FisherSet, apply_temperature, compute_fishers, fisher_merge, fit_temperature
from models.data import load_split, train_validation
from models.networks import build, config_from_dict, predict_proba
from models.parity import mixture_targets, train_parity

METHODS = ("coin", "average", "parity")
CALIBRATION_IMAGES = 1000  # validation images for the Fisher; see docs/coin.md for the cost trade-off


@dataclass
class CodedSet:
    """r coded models over k members, with what they cost to build."""

    method: str
    coeffs: np.ndarray  # (r, k)
    models: list[nn.Module]
    build_seconds: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ingredients:
    """What every method may need, computed lazily and shared across k, r and methods."""

    bundle: Bundle
    members: list[nn.Module]
    calibration_images: int = CALIBRATION_IMAGES
    fisher_kind: str = "true"
    parity_epochs: int = 6
    calibrate: bool = True  # fit one output temperature per merged model to the barycenter objective
    _fishers: FisherSet | None = None
    _splits: tuple[Any, Any] | None = None

    def splits(self) -> tuple[Any, Any]:
        if self._splits is None:
            self._splits = train_validation(load_split("train"))
        return self._splits

    def calibration(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `calibration_images` validation images and their labels (never test data)."""
        _, validation = self.splits()
        calib = validation.head(self.calibration_images)
        return torch.from_numpy(calib.images), torch.from_numpy(calib.labels)

    def fishers(self) -> FisherSet:
        if self._fishers is None:
            images, labels = self.calibration()
            self._fishers = compute_fishers(self.members, images, labels, kind=self.fisher_kind)  # type: ignore[arg-type]
        return self._fishers


def _model_from_state(bundle: Bundle, state: dict[str, torch.Tensor]) -> nn.Module:
    model = build(bundle.architecture, config_from_dict(bundle.architecture, bundle.manifest["config"]))
    model.load_state_dict(state)
    return model.eval()


def build_coded(ingredients: Ingredients, method: str, k: int, r: int) -> CodedSet:
    """r coded models of `method` over the first k members."""
    if method not in METHODS:
        raise ValueError(f"unknown coding method {method!r}; expected one of {METHODS}")
    coeffs = coefficients(k, r)
    members = ingredients.members[:k]
    bundle = ingredients.bundle
    if method == "parity":
        train, _ = ingredients.splits()
        cfg = config_from_dict(bundle.architecture, bundle.manifest["config"])
        epochs = ingredients.parity_epochs
        trained = [train_parity(bundle.architecture, cfg, members, train, row, epochs=epochs) for row in coeffs]
        info = {"epochs": ingredients.parity_epochs, "train_images": len(train)}
        return CodedSet(method, coeffs, [m for m, _ in trained], sum(s for _, s in trained), info)
    thetas = [{n: p.detach() for n, p in m.state_dict().items()} for m in members]
    details: dict[str, Any] = {}
    seconds = 0.0
    fishers = None
    if method == "coin":
        fs = ingredients.fishers()
        fishers, seconds = fs.fishers[:k], sum(fs.seconds[:k])
        details = {"fisher": {"kind": fs.kind, "calibration_images": fs.images}}
    models, temperatures = [], []
    for row in coeffs:
        start = time.perf_counter()
        model = _model_from_state(bundle, fisher_merge(thetas, fishers, row))
        if ingredients.calibrate:
            temperatures.append(_calibrate(model, members, row, ingredients))
        models.append(model)
        seconds += time.perf_counter() - start
    if ingredients.calibrate:
        details["temperatures"] = [round(t, 4) for t in temperatures]
    return CodedSet(method, coeffs, models, seconds, details)


def _calibrate(model: nn.Module, members: Sequence[nn.Module], row: np.ndarray, ingredients: Ingredients) -> float:
    """Fit and fold in the temperature that brings the merged model closest to the mixture."""
    images, _ = ingredients.calibration()
    mixture = mixture_targets(members, images, row)
    with torch.no_grad():
        logits = model(images)
    temperature = fit_temperature(logits, mixture)
    apply_temperature(model, temperature)
    return temperature


def write_coded(
    bundle: Bundle, coded: CodedSet, test_images: torch.Tensor, test_labels: np.ndarray
) -> list[dict[str, Any]]:
    """Save the coded models into the bundle (replacing earlier ones of the same method)."""
    r, _ = coded.coeffs.shape
    names = bundle.member_names
    entries = []
    for index, (model, row) in enumerate(zip(coded.models, coded.coeffs, strict=True)):
        name = f"coded-{coded.method}-{index}"
        accuracy = float(np.mean(predict_proba(model, test_images).numpy().argmax(1) == test_labels))
        entries.append(
            {
                "name": name,
                **save_model(bundle.path, name, model),
                "method": coded.method,
                "row": index,
                "r": r,
                "coefficients": [round(float(a), 12) for a in row],
                "members": names,
                "build_seconds": round(coded.build_seconds, 3),
                "test_accuracy": accuracy,
                **coded.details,
            }
        )
    keep = [e for e in bundle.coded if e.get("method") != coded.method]
    written = {e["file"] for e in entries}
    for old in bundle.coded:
        if old.get("method") == coded.method and old["file"] not in written:
            (bundle.path / old["file"]).unlink(missing_ok=True)
    bundle.manifest["coded"] = keep + entries
    bundle.manifest.setdefault("coding", {})[coded.method] = {
        "r": r,
        "worst_condition_number": round(max(condition_numbers(coded.coeffs).values()), 4),
    }
    bundle.save()
    return entries


def members_of(bundle: Bundle, names: Sequence[str] | None = None) -> list[nn.Module]:
    return [bundle.build_model(n) for n in (names or bundle.member_names)]
