from __future__ import annotations

import sys

import pytest
import torch

from models import data
from models.bundle import open_bundle
from models.coded import Ingredients, members_of
from models.data import load_split, train_validation
from models.distill import DistillConfig
from models.selection import (
    choose_coding_method,
    choose_plan,
    choose_recipe,
    coding_scores,
    recipe_rows,
    select_coding_method,
)
from models.train import TrainingConfig


class SplitGuardError(AssertionError):
    pass


@pytest.fixture
def no_test_split(monkeypatch):
    """Every module's `load_split` raises on "test": selection code must never read it (DESIGN §5)."""
    real = data.load_split

    def guarded(name, *args, **kwargs):
        if name == "test":
            raise SplitGuardError("selection code read the test split")
        return real(name, *args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("models") and getattr(module, "load_split", None) is real:
            monkeypatch.setattr(module, "load_split", guarded)


def test_the_guard_really_trips(no_test_split):
    import models.sources

    with pytest.raises(SplitGuardError):
        models.sources.load_split("test")


def test_coding_method_is_chosen_without_reading_test(tiny_bundle_dir, no_test_split):
    bundle = open_bundle(tiny_bundle_dir)
    ingredients = Ingredients(
        bundle, members_of(bundle), calibration_images=200, distill=DistillConfig(steps=3), distill_images=300
    )
    method, rows = select_coding_method(bundle, ingredients, ["average", "average-distill", "none"], ks=(2,), rs=(1,))
    assert method in {"average", "average-distill"}
    assert {row["split"] for row in rows} == {"validation"}


def test_choice_reads_validation_rows_only():
    def row(method, split, value):
        return {
            "method": method,
            "k": 2,
            "r": 1,
            "straggler": "0",
            "split": split,
            "member_accuracy": 0.9,
            "decoded_accuracy": 0.9,
            "agreement": 0.9,
            "agreement_on_disagreement": value,
            "build_seconds": 1.0,
        }

    rows = [row("average", "validation", 0.80), row("regmean", "validation", 0.85), row("none", "validation", 0.99)]
    rows += [row("average", "test", 0.99), row("regmean", "test", 0.10)]
    assert choose_coding_method(rows) == "regmean"
    assert [s["beats_average"] for s in coding_scores(rows)] == ["1/1", "0/1"]


def test_plan_and_recipe_are_chosen_without_reading_test(tiny_bundle_dir, no_test_split):
    bundle = open_bundle(tiny_bundle_dir)
    train, validation = train_validation(load_split("train"))
    plan, ladder = choose_plan(bundle.build_model("member-0"), validation.head(300))
    assert len(plan.planes) == 1
    assert [row["exponents"] for row in ladder] == ["per-tensor", "per-channel", "per-channel, int8"]
    int_row = ladder[-1]
    if plan.grid is not None:  # the int8 resolution was close enough: its planes and grid are served
        assert int_row[str(plan.planes[0])] >= int_row["float32"] - 0.05
        assert list(plan.grid) == int_row["grids"][str(plan.planes[0])]
        assert len(plan.grid) == 3  # conv, conv, hidden linear
    candidates = [TrainingConfig(k=2, member_steps=2, alpha=a, batch_size=32) for a in (0.5, 2.0)]
    rows = recipe_rows(
        bundle.build_model("base"), train.head(400), validation.head(200), candidates, log=lambda _m: None
    )
    assert [r["alpha"] for r in rows] == [0.5, 2.0]
    assert choose_recipe(rows, TrainingConfig()).alpha in {0.5, 2.0}


def test_plan_is_the_fewest_planes_within_tolerance(monkeypatch):
    ladder = [
        {"exponents": "per-tensor", "1": 0.1, "2": 0.5, "3": 0.86, "4": 0.88, "float32": 0.9},
        {"exponents": "per-channel", "1": 0.1, "2": 0.6, "3": 0.85, "4": 0.89, "float32": 0.9},
    ]
    monkeypatch.setattr("models.selection.ladder_accuracy", lambda *_a, **_k: ladder)
    images = torch.zeros(1, 1, 28, 28).numpy()
    plan, _ = choose_plan(torch.nn.Identity(), data.Split(images, torch.zeros(1, dtype=torch.long).numpy()))
    assert plan.planes == (3,) and plan.per_channel is False  # 3 planes: per-tensor is the more accurate


def test_methods_over_the_build_budget_are_not_chosen():
    def row(method, value, seconds):
        return {
            "method": method,
            "k": 2,
            "r": 1,
            "straggler": "0",
            "split": "validation",
            "member_accuracy": 0.9,
            "decoded_accuracy": 0.9,
            "agreement": 0.9,
            "agreement_on_disagreement": value,
            "build_seconds": seconds,
        }

    rows = [row("parity", 0.95, 100.0), row("coin-distill", 0.90, 11.0), row("average-distill", 0.88, 9.0)]
    assert choose_coding_method(rows) == "average-distill"
    assert [s["worst_build_vs_parity"] for s in coding_scores(rows)] == [1.0, 0.11, 0.09]
