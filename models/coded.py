"""Building coded models of any method for a set of members.

Merges: `coin` (Fisher), `coin-norm` (each member's Fisher scaled to unit mean per tensor),
`average`, `regmean` (models/regmean.py); `-distill` after a merge adds a few Adam steps toward
the barycenter (models/distill.py). Trained baseline: `parity` (ParM).

Build costs are CPU seconds of this process (time.process_time, all torch threads summed), not wall
clock: the reference machine's two cores are shared, and CPU time is what one method costs against
another whatever else runs.

Used by `coinserve code` (coded models written into a bundle, for serving) and by the offline
evaluation (coded models for the first k members, kept in memory).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from models.bundle import Bundle, save_model
from models.coding import coefficients, condition_numbers
from models.coin import FisherSet, apply_temperature, compute_fishers, fisher_merge, fit_temperature
from models.data import Split
from models.distill import DistillConfig, distill
from models.errors import BundleError
from models.networks import predict_proba
from models.parity import mixture_targets, train_parity
from models.regmean import DEFAULT_ALPHA, GramSet, input_grams, regmean_merge
from models.sources import DataSource, source

MERGES = ("coin", "coin-norm", "average", "regmean")
METHODS = (*MERGES, *(f"{m}-distill" for m in MERGES), "parity")
EVALUATED = ("coin", "coin-norm", "average", "regmean", "coin-distill", "average-distill", "regmean-distill", "parity")
CALIBRATION_IMAGES = (
    1000  # calibration (Fashion-MNIST: validation) images for the Fisher; see docs/coin.md for the cost trade-off
)
# Unlabelled training images the *-distill methods train on: 1,000 calibration images over-fit
# (validation, k = 4: agreement on disagreement 0.832 with them against 0.855 with 10,000).
DISTILL_IMAGES = 10000  # (an imported bundle has fewer: all its calibration inputs)
BUILD_OPTIONS = (
    "calibration_images",
    "fisher",
    "parity_epochs",
    "no_calibrate",
    "regmean_alpha",
    "distill_steps",
    "distill_lr",
    "distill_loss",
    "distill_images",
)


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
    regmean_alpha: float = DEFAULT_ALPHA
    distill: DistillConfig = field(default_factory=DistillConfig)
    distill_images: int = DISTILL_IMAGES  # 0: distil on the calibration set; N: the first N training images
    _fishers: FisherSet | None = None
    _grams: tuple[list[GramSet], list[float]] | None = None
    _source: DataSource | None = None

    def data(self) -> DataSource:
        """The bundle's data (models/sources.py): read once, shared by every method."""
        if self._source is None:
            self._source = source(self.bundle)
        return self._source

    def calibration(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first `calibration_images` calibration inputs (labels where the bundle has them; never test data)."""
        images, labels = self.data().calibration_set(self.calibration_images)
        return torch.from_numpy(images), None if labels is None else torch.from_numpy(labels)

    def distillation_inputs(self) -> torch.Tensor:
        return torch.from_numpy(self.data().unlabelled_set(self.distill_images))

    def selection(self) -> Split:
        """Labelled inputs the calibration set did not use: where methods are compared and chosen."""
        return self.data().selection(self.calibration_images)

    def fishers(self) -> FisherSet:
        if self._fishers is None:
            images, labels = self.calibration()
            if labels is None and self.fisher_kind == "empirical":
                raise BundleError(
                    f"the empirical Fisher needs labelled calibration inputs, which {self.bundle.path} lacks"
                )
            self._fishers = compute_fishers(self.members, images, labels, kind=self.fisher_kind)  # type: ignore[arg-type]
        return self._fishers

    def grams(self) -> tuple[list[GramSet], list[float]]:
        """Each member's input Grams on the calibration set, and the seconds each took."""
        if self._grams is None:
            images, _ = self.calibration()
            grams, seconds = [], []
            for member in self.members:
                start = time.process_time()
                grams.append(input_grams(member, images))
                seconds.append(time.process_time() - start)
            self._grams = (grams, seconds)
        return self._grams


def ingredients_from_options(
    bundle: Bundle,
    *,
    calibration_images: int = CALIBRATION_IMAGES,
    fisher: str = "true",
    parity_epochs: int = 6,
    no_calibrate: bool = False,
    regmean_alpha: float = DEFAULT_ALPHA,
    distill_steps: int = DistillConfig.steps,
    distill_lr: float = DistillConfig.lr,
    distill_loss: str = DistillConfig.loss,
    distill_images: int = DISTILL_IMAGES,
) -> Ingredients:
    """Ingredients from the flags of `coinserve code` / `eval-coding` (names as in BUILD_OPTIONS)."""
    return Ingredients(
        bundle,
        members_of(bundle),
        calibration_images=calibration_images,
        fisher_kind=fisher,
        parity_epochs=parity_epochs,
        calibrate=not no_calibrate,
        regmean_alpha=regmean_alpha,
        distill=DistillConfig(steps=distill_steps, lr=distill_lr, loss=distill_loss),
        distill_images=distill_images,
    )


def _model_from_state(bundle: Bundle, state: dict[str, torch.Tensor]) -> nn.Module:
    model = bundle.new_model()
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
        train = ingredients.data().unlabelled
        epochs = ingredients.parity_epochs
        trained = [train_parity(bundle.new_model, members, train, row, epochs=epochs) for row in coeffs]
        info = {"epochs": ingredients.parity_epochs, "train_images": len(train)}
        return CodedSet(method, coeffs, [m for m, _ in trained], sum(s for _, s in trained), info)
    merge, is_distilled = method.removesuffix("-distill"), method.endswith("-distill")
    thetas = [{n: p.detach() for n, p in m.state_dict().items()} for m in members]
    merge_one, seconds, details = _merger(ingredients, merge, thetas, k)
    models, temperatures, distilled = [], [], []
    for row in coeffs:
        start = time.process_time()
        model = _model_from_state(bundle, merge_one(row))
        temperature = _calibrate(model, members, row, ingredients) if ingredients.calibrate else 1.0
        if is_distilled:  # from the calibrated merge, then one more temperature fit (cheap, never worse)
            images = ingredients.distillation_inputs()
            distilled.append(distill(model, images, mixture_targets(members, images, row), ingredients.distill))
            temperature *= _calibrate(model, members, row, ingredients) if ingredients.calibrate else 1.0
        temperatures.append(temperature)
        models.append(model)
        seconds += time.process_time() - start
    if is_distilled:
        dcfg = ingredients.distill
        details["distill"] = {
            "steps": dcfg.steps,
            "lr": dcfg.lr,
            "loss": dcfg.loss,
            "images": len(images),
            "rows": distilled,
        }
    if ingredients.calibrate:
        details["temperatures"] = [round(t, 4) for t in temperatures]
    return CodedSet(method, coeffs, models, seconds, details)


def _merger(
    ingredients: Ingredients, merge: str, thetas: list[dict[str, torch.Tensor]], k: int
) -> tuple[Callable[[np.ndarray], dict[str, torch.Tensor]], float, dict[str, Any]]:
    """(row → merged state dict, seconds of the per-member statistics it needs, manifest details)."""
    if merge == "regmean":
        grams, gram_seconds = ingredients.grams()
        layers = dict(_linear_modules(ingredients.members[0]))
        alpha = ingredients.regmean_alpha
        info = {"regmean": {"alpha": alpha, "calibration_images": ingredients.calibration_images}}
        return lambda row: regmean_merge(thetas, grams[:k], row, layers, alpha), sum(gram_seconds[:k]), info
    if merge == "average":
        return lambda row: fisher_merge(thetas, None, row), 0.0, {}
    fs = ingredients.fishers()
    fishers = fs.fishers[:k] if merge == "coin" else [_unit_mean(f) for f in fs.fishers[:k]]
    details: dict[str, Any] = {
        "fisher": {"kind": fs.kind, "calibration_images": fs.images, "normalised": merge == "coin-norm"}
    }
    return lambda row: fisher_merge(thetas, fishers, row), sum(fs.seconds[:k]), details


def _unit_mean(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor's Fisher divided by its mean: removes the tilt toward the least confident member."""
    return {n: f / f.mean().clamp_min(1e-30) for n, f in fisher.items()}


def _linear_modules(model: nn.Module) -> list[tuple[str, nn.Linear | nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def _calibrate(model: nn.Module, members: Sequence[nn.Module], row: np.ndarray, ingredients: Ingredients) -> float:
    """Fit and fold in the temperature that brings the merged model closest to the mixture."""
    images, _ = ingredients.calibration()
    mixture = mixture_targets(members, images, row)
    with torch.no_grad():
        logits = model(images)
    temperature = fit_temperature(logits, mixture)
    apply_temperature(model, temperature)
    return temperature


def write_coded(bundle: Bundle, coded: CodedSet, test: Split | None) -> list[dict[str, Any]]:
    """Save the coded models into the bundle (replacing earlier ones of the same method), with
    their test accuracy where the bundle has a labelled test set."""
    r, _ = coded.coeffs.shape
    names = bundle.member_names
    entries = []
    for index, (model, row) in enumerate(zip(coded.models, coded.coeffs, strict=True)):
        name = f"coded-{coded.method}-{index}"
        accuracy = {}
        if test is not None:
            probs = predict_proba(model, torch.from_numpy(test.images)).numpy()
            accuracy = {"test_accuracy": float(np.mean(probs.argmax(1) == test.labels))}
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
                **accuracy,
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
