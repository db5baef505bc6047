from __future__ import annotations

import functools
import sys

import pytest
import torch

from models import data, int8
from models.bundle import open_bundle
from models.coded import Ingredients, members_of
from models.data import load_split, train_validation
from models.distill import DistillConfig
from models.selection import (
    GRID_SPAN,
    GRID_START,
    choose_coding_method,
    choose_grid,
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
    int_row = ladder[-1]
    # the float32-truncation rows are measured only when no int8 resolution is close enough
    kinds = ["per-channel, int8"] if plan.grid is not None else ["per-tensor", "per-channel", "per-channel, int8"]
    assert [row["exponents"] for row in ladder] == kinds
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


def _grid_from_scratch(model, planes, images, labels):
    """The grid search as it was before issue 29: every trial a fresh IntResolution over every image;
    → (grid, accuracy, how many grids it measured)."""
    calls: list[list[int]] = []

    def accuracy(grid):
        calls.append(grid)
        res = int8.IntResolution(model, planes, grid, int8.available_engines()[0])
        predictions = torch.cat([res.forward(images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)])
        return float((predictions.numpy() == labels).mean())

    grid = [GRID_START] * int8.hidden_layers(model)
    best = accuracy(grid)
    for layer in range(len(grid)):
        for g in GRID_SPAN:
            if g != grid[layer]:
                trial = [*grid[:layer], g, *grid[layer + 1 :]]
                acc = accuracy(trial)
                if acc > best or (acc == best and g < grid[layer]):
                    grid, best = trial, acc
    return tuple(grid), best, len(calls)


@pytest.mark.skipif(not int8.available_engines(), reason="no int8 engine in this PyTorch build")
def test_grid_search_sharing_work_chooses_what_a_search_from_scratch_does(tiny_bundle_dir):
    """Issue 29: the search reuses the activations entering the layer it varies; same grid, same accuracy."""
    bundle = open_bundle(tiny_bundle_dir)
    model = bundle.build_model("member-0")
    _, validation = train_validation(load_split("train"))
    split = validation.head(1200)  # two chunks of the 1000-image passes
    images = torch.from_numpy(split.images.copy())
    images[5] = 0  # an all-zero row: its own input exponent, its own group
    for planes in (2, 3, 4, 6):
        passes: list[int] = []
        got = choose_grid(model, planes, images, split.labels, tick=functools.partial(passes.append, 1))
        grid, accuracy, measured = _grid_from_scratch(model, planes, images, split.labels)
        assert got == (grid, accuracy), planes
        assert len(passes) == measured  # progress: one tick per grid measured


@pytest.mark.skipif(not int8.available_engines(), reason="no int8 engine in this PyTorch build")
def test_plan_search_stops_at_the_first_close_plane_count(tiny_bundle_dir):
    bundle = open_bundle(tiny_bundle_dir)
    model = bundle.build_model("member-0")
    _, validation = train_validation(load_split("train"))
    plan, ladder = choose_plan(model, validation.head(300), tolerance=1.0)  # every plane count is close
    assert plan.planes == (2,) and plan.grid is not None
    assert [k for k in ladder[-1] if k.isdigit()] == ["2"]  # 3..6 never measured
