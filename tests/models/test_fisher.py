from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from models.fisher import diagonal_fisher
from models.networks import CNNConfig, MLPConfig, build_cnn, build_mlp


def _reference(model: nn.Module, images: torch.Tensor, weights_per_class: torch.Tensor) -> dict[str, torch.Tensor]:
    """torch.func per-sample gradients, squared and weighted: Σ_n Σ_c w[n, c] (∂ log p_c(x_n))² / N."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def log_prob(p, x, onehot):
        return (torch.log_softmax(functional_call(model, p, (x[None],)), dim=1)[0] * onehot).sum()

    per_sample = vmap(grad(log_prob), in_dims=(None, 0, 0))
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    classes = weights_per_class.shape[1]
    for c in range(classes):
        onehot = nn.functional.one_hot(torch.full((len(images),), c), classes).float()
        grads = per_sample(params, images, onehot)
        for k in total:
            w = weights_per_class[:, c].view(-1, *([1] * (grads[k].dim() - 1)))
            total[k] += (w * grads[k] ** 2).sum(0)
    return {k: v / len(images) for k, v in total.items()}


@pytest.mark.parametrize(
    "model",
    [build_cnn(CNNConfig(channels=(3, 4), hidden=8)), build_mlp(MLPConfig(hidden=(16, 8)))],
    ids=["cnn", "mlp"],
)
def test_true_fisher_matches_torch_func_per_sample_gradients(model):
    torch.manual_seed(0)
    images = torch.rand(12, 1, 28, 28)
    with torch.no_grad():
        probs = torch.softmax(model(images), dim=1)
    fast = diagonal_fisher(model, images, kind="true", batch_size=5)
    slow = _reference(model, images, probs)
    assert fast.keys() == slow.keys()
    for key in fast:
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-4, atol=1e-9)


def test_empirical_fisher_uses_the_labels():
    torch.manual_seed(1)
    model = build_mlp(MLPConfig(hidden=(8,)))
    images, labels = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5])
    onehot = nn.functional.one_hot(labels, 10).float()
    fast = diagonal_fisher(model, images, labels, kind="empirical")
    slow = _reference(model, images, onehot)
    for key in fast:
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-4, atol=1e-9)


def test_sampled_fisher_is_seeded_and_close_to_the_true_one():
    torch.manual_seed(2)
    model = build_mlp(MLPConfig(hidden=(8,)))
    images = torch.rand(400, 1, 28, 28)
    a = diagonal_fisher(model, images, kind="sampled", seed=3)
    b = diagonal_fisher(model, images, kind="sampled", seed=3)
    true = diagonal_fisher(model, images, kind="true")
    for key in a:
        assert torch.equal(a[key], b[key])
        assert torch.allclose(a[key].sum(), true[key].sum(), rtol=0.15)


def test_fisher_leaves_the_model_trainable():
    model = build_mlp(MLPConfig(hidden=(8,)))
    diagonal_fisher(model, torch.rand(3, 1, 28, 28))
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_kind_and_missing_labels_are_refused():
    model = build_mlp(MLPConfig(hidden=(8,)))
    with pytest.raises(ValueError, match="unknown Fisher kind"):
        diagonal_fisher(model, torch.rand(2, 1, 28, 28), kind="fancy")
    with pytest.raises(ValueError, match="needs labels"):
        diagonal_fisher(model, torch.rand(2, 1, 28, 28), kind="empirical")
