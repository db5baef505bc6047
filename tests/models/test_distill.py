from __future__ import annotations

import pytest
import torch
from torch import nn

from models.distill import DistillConfig, distill


def _loss(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((torch.softmax(model(images), 1) - target) ** 2).sum(1).mean())


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_distillation_moves_the_model_toward_the_mixture(loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    images = torch.rand(64, 1, 4, 4)
    target = torch.softmax(torch.randn(64, 3), 1)
    before = _loss(model, images, target)
    info = distill(model, images, target, DistillConfig(steps=60, lr=3e-2, batch_size=32, loss=loss))
    assert info["steps"] == 60 and info["seconds"] > 0
    assert _loss(model, images, target) < 0.7 * before


def test_unknown_distillation_loss_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="unknown distillation loss 'l1'"):
        distill(model, torch.rand(4, 1, 4, 4), torch.full((4, 3), 1 / 3), DistillConfig(steps=1, loss="l1"))
