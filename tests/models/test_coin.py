from __future__ import annotations

import numpy as np
import torch

from models.coin import apply_temperature, fisher_merge, fit_temperature
from models.networks import MLPConfig, build_mlp


def _states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    return [build_mlp(MLPConfig(hidden=(6,))).state_dict() for _ in range(n)]


def test_uniform_fisher_gives_the_plain_average():
    thetas = _states(3)
    ones = [{k: torch.ones_like(v) for k, v in t.items()} for t in thetas]
    coeffs = np.full(3, 1 / 3)
    merged, average = fisher_merge(thetas, ones, coeffs), fisher_merge(thetas, None, coeffs)
    for key in merged:
        torch.testing.assert_close(merged[key], average[key])
        torch.testing.assert_close(average[key], sum(t[key] for t in thetas) / 3)


def test_identical_members_give_a_coded_model_equal_to_them():
    theta = _states(1)[0]
    fishers = [{k: torch.rand_like(v) for k, v in theta.items()} for _ in range(4)]
    merged = fisher_merge([theta] * 4, fishers, np.full(4, 0.25))
    for key in merged:
        torch.testing.assert_close(merged[key], theta[key])


def test_fisher_weights_pull_each_coordinate_toward_the_more_certain_member():
    a = {"w": torch.tensor([0.0, 0.0])}
    b = {"w": torch.tensor([1.0, 1.0])}
    fa = {"w": torch.tensor([3.0, 1.0])}
    fb = {"w": torch.tensor([1.0, 3.0])}
    merged = fisher_merge([a, b], [fa, fb], np.array([0.5, 0.5]))
    torch.testing.assert_close(merged["w"], torch.tensor([0.25, 0.75]))


def test_negligible_fisher_falls_back_to_the_weighted_mean():
    a, b = {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}
    fa, fb = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 0.0])}
    merged = fisher_merge([a, b], [fa, fb], np.array([0.25, 0.75]))
    torch.testing.assert_close(merged["w"], torch.tensor([0.75, 0.75]))


def test_fit_temperature_recovers_a_known_temperature():
    torch.manual_seed(0)
    logits = torch.randn(500, 10) * 4
    target = torch.softmax(logits / 1.7, dim=1)
    assert abs(fit_temperature(logits, target) - 1.7) < 1e-4


def test_apply_temperature_divides_the_logits():
    torch.manual_seed(0)
    model = build_mlp(MLPConfig(hidden=(6,))).eval()
    x = torch.rand(4, 1, 28, 28)
    before = model(x).detach()
    apply_temperature(model, 2.5)
    torch.testing.assert_close(model(x).detach(), before / 2.5)
