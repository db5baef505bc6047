from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.regmean import input_grams, regmean_merge


def _net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 8, 4))


def _layers(model: nn.Module) -> dict[str, nn.Linear | nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_gram_of_a_conv_layer_is_the_gram_of_its_unfolded_patches():
    net, x = _net(0), torch.rand(5, 1, 8, 8)
    gram = input_grams(net, x, batch_size=2).grams["0"]  # two batches: sums must add up
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 9).double()
    rows = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(gram, rows.T @ rows / len(rows))


def test_merging_a_model_with_itself_returns_it():
    net, x = _net(0), torch.rand(20, 1, 8, 8)
    grams = input_grams(net, x)
    merged = regmean_merge([_state(net)] * 3, [grams] * 3, np.full(3, 1 / 3), _layers(net), alpha=0.9)
    for key, value in _state(net).items():
        torch.testing.assert_close(merged[key], value, atol=1e-5, rtol=1e-5)


def test_linear_layer_merge_is_the_weighted_least_squares_solution():
    torch.manual_seed(1)
    members = [nn.Linear(4, 2) for _ in range(2)]
    inputs = [torch.randn(50, 4), torch.randn(50, 4) * 2 + 1]  # each member sees its own inputs
    grams = []
    for member, x in zip(members, inputs, strict=True):
        grams.append(input_grams(nn.Sequential(member), x))
    grams = [type(g)({"0": g.grams["0"]}) for g in grams]
    a = np.array([0.3, 0.7])
    merged = regmean_merge(
        [{f"0.{k}": v for k, v in _state(m).items()} for m in members], grams, a, {"0": members[0]}, 1.0
    )
    # argmin_W Σ a_i ‖[X_i 1] W − [X_i 1] W_i‖² / N, solved directly
    design = [torch.cat([x, torch.ones(50, 1)], 1).double() for x in inputs]
    targets = [d @ torch.cat([m.weight, m.bias[:, None]], 1).T.double() for d, m in zip(design, members, strict=True)]
    lhs = sum(w * d.T @ d for w, d in zip(a, design, strict=True))
    rhs = sum(w * d.T @ t for w, d, t in zip(a, design, targets, strict=True))
    expected = torch.linalg.solve(lhs, rhs).T.float()
    torch.testing.assert_close(merged["0.weight"], expected[:, :4], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged["0.bias"], expected[:, 4], atol=1e-4, rtol=1e-4)


def test_alpha_zero_keeps_only_the_diagonal_and_dead_inputs_keep_the_average():
    nets = [_net(0), _net(1)]
    x = torch.rand(10, 1, 8, 8)
    x[:, :, :, :] = 0  # every input pixel dead: only the bias column is excited
    grams = [input_grams(n, x) for n in nets]
    merged = regmean_merge([_state(n) for n in nets], grams, np.array([0.5, 0.5]), _layers(nets[0]), alpha=0.0)
    average = (_state(nets[0])["0.weight"] + _state(nets[1])["0.weight"]) / 2
    torch.testing.assert_close(merged["0.weight"], average, atol=1e-5, rtol=1e-4)
