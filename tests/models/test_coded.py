from __future__ import annotations

import numpy as np
import pytest
import torch

from models.bundle import open_bundle
from models.coded import Ingredients, build_coded, members_of, write_coded
from models.coding import coefficients
from models.data import load_split
from models.distill import DistillConfig
from models.parity import mixture_targets, train_parity


@pytest.fixture
def ingredients(tiny_bundle_copy):
    bundle = open_bundle(tiny_bundle_copy)
    distill = DistillConfig(steps=3)
    return Ingredients(
        bundle, members_of(bundle), calibration_images=200, parity_epochs=1, distill=distill, distill_images=300
    )


@pytest.mark.parametrize(
    ("method", "r"),
    [("coin", 1), ("coin", 2), ("average", 1), ("regmean", 2), ("average-distill", 2)],
)
def test_merged_coded_models_are_built_and_calibrated(ingredients, method, r):
    coded = build_coded(ingredients, method, k=3, r=r)
    assert len(coded.models) == r
    np.testing.assert_array_equal(coded.coeffs, coefficients(3, r))
    assert len(coded.details["temperatures"]) == r
    assert coded.build_seconds > 0


def test_coin_reuses_the_fishers_across_k(ingredients):
    build_coded(ingredients, "coin", k=3, r=1)
    first = ingredients.fishers()
    build_coded(ingredients, "coin", k=2, r=1)
    assert ingredients.fishers() is first


def test_written_coded_models_verify_and_replace_older_ones(ingredients):
    bundle = ingredients.bundle
    test = load_split("test").head(100)
    write_coded(bundle, build_coded(ingredients, "coin", 3, 2), test)
    assert (bundle.path / "coded-coin-1.safetensors").exists()
    entries = write_coded(bundle, build_coded(ingredients, "coin", 3, 1), test)
    reopened = open_bundle(bundle.path)  # verifies every hash
    assert [e["name"] for e in reopened.coded] == ["coded-coin-0"] == [e["name"] for e in entries]
    entry = reopened.coded[0]
    assert entry["method"] == "coin" and entry["r"] == 1 and entry["members"] == ["member-0", "member-1", "member-2"]
    assert entry["coefficients"] == pytest.approx([1 / 3] * 3)
    assert not (bundle.path / "coded-coin-1.safetensors").exists()
    assert reopened.build_model("coded-coin-0") is not None


def test_parity_model_learns_the_mixture(ingredients):
    members = ingredients.members
    train = ingredients.data().unlabelled[:1500]
    images = torch.from_numpy(train[:300])
    row = coefficients(3, 1)[0]
    target = mixture_targets(members, images, row)
    bundle = ingredients.bundle
    torch.manual_seed(0)
    fresh = bundle.new_model().eval()
    model, seconds = train_parity(bundle.new_model, members, train, row, epochs=2)
    with torch.no_grad():
        before = torch.mean((torch.softmax(fresh(images), 1) - target) ** 2)
        after = torch.mean((torch.softmax(model(images), 1) - target) ** 2)
    assert seconds > 0 and after < 0.5 * before


def test_unknown_method_is_refused(ingredients):
    with pytest.raises(ValueError, match="unknown coding method 'magic'"):
        build_coded(ingredients, "magic", 3, 1)


def test_distilled_rows_record_steps_and_seconds(ingredients):
    coded = build_coded(ingredients, "regmean-distill", k=2, r=2)
    assert coded.details["distill"]["steps"] == 3
    assert [row["steps"] for row in coded.details["distill"]["rows"]] == [3, 3]
    assert all(row["seconds"] > 0 for row in coded.details["distill"]["rows"])
    assert coded.details["regmean"]["alpha"] == pytest.approx(0.95)


def test_each_coded_row_is_distilled_toward_its_own_mixture(ingredients):
    coded = build_coded(ingredients, "average-distill", k=3, r=2)
    images, _ = ingredients.calibration()
    targets = [mixture_targets(ingredients.members[:3], images, row) for row in coded.coeffs]  # (N, C) each
    with torch.no_grad():
        outputs = [torch.softmax(m(images), 1) for m in coded.models]
    errors = [[float(torch.mean((out - target) ** 2)) for target in targets] for out in outputs]
    assert errors[0][0] < errors[0][1] and errors[1][1] < errors[1][0]


def test_normalised_fisher_has_unit_mean_per_tensor():
    from models.coded import _unit_mean

    fisher = {"w": torch.tensor([1.0, 3.0]), "b": torch.tensor([0.0, 0.0])}
    normalised = _unit_mean(fisher)
    torch.testing.assert_close(normalised["w"], torch.tensor([0.5, 1.5]))
    assert torch.all(normalised["b"] == 0)  # an all-zero Fisher stays zero (the merge falls back to the mean)
