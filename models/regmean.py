"""RegMean: per-layer least-squares merging of k members (Jin et al., ICLR 2023), with coding weights.

For every Linear layer, with X_i the inputs that layer sees under member i on the calibration set
(a ones column appended, so the bias is one more row of W) and G_i = X_iᵀX_i / N its Gram matrix,

    Wᵀ = (Σ_i a_i G̃_i)⁻¹ Σ_i a_i G̃_i W_iᵀ,   G̃_i = α G_i + (1 − α) diag(G_i),

the minimiser of Σ_i a_i ‖X_i W − X_i W_i‖² with the off-diagonal terms shrunk by α (the paper's
guard against ill-conditioned Grams; α = 1 is the plain least-squares merge). A Conv2d is the same
linear map applied to unfolded input patches (F.unfold): X_i has one row per (image, position).
Parameters outside Linear/Conv2d layers are averaged with the coefficients a. DESIGN §1.1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_ALPHA = 0.95  # off-diagonal shrink; chosen on the validation split (docs/coin.md)


@dataclass(frozen=True)
class GramSet:
    """Input Gram matrices of one member: layer name → (d_in + 1, d_in + 1), float64, per input row."""

    grams: dict[str, torch.Tensor]


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear | nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


def _rows(layer: nn.Linear | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of a least-squares problem, ones column appended: (rows, d_in + 1)."""
    if isinstance(layer, nn.Conv2d):
        if isinstance(layer.padding, str):
            raise TypeError(f"regmean needs numeric Conv2d padding, not {layer.padding!r}")
        padding = layer.padding
        patches = F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)  # (B, d_in, P)
        x = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B*P, d_in)
    ones = torch.ones(len(x), 1, dtype=x.dtype)
    return torch.cat([x.reshape(len(x), -1), ones], dim=1)


@torch.no_grad()
def input_grams(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> GramSet:
    """G = XᵀX / rows for every Linear and Conv2d layer, from one pass over `images` (B, 1, 28, 28)."""
    layers = _linear_layers(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(layers, 0)

    def hook(name: str, layer: nn.Linear | nn.Conv2d) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            rows = _rows(layer, inputs[0].detach()).double()
            sums[name] = sums[name] + rows.T @ rows if name in sums else rows.T @ rows
            counts[name] += len(rows)

        return record

    handles = [layer.register_forward_pre_hook(hook(n, layer)) for n, layer in layers.items()]
    try:
        model.eval()
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return GramSet({n: sums[n] / counts[n] for n in layers})


def _weighted_mean(tensors: Sequence[torch.Tensor], a: np.ndarray) -> torch.Tensor:
    stacked = torch.stack([t.double() for t in tensors])  # (k, *shape)
    return torch.tensordot(torch.from_numpy(a), stacked, dims=1).float()


def _shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def _stacked(layer_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Wᵀ with the bias as its last row: (d_in + 1, d_out)."""
    w = layer_weight.double().reshape(layer_weight.shape[0], -1)  # (d_out, d_in)
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return torch.cat([w, b[:, None]], dim=1).T


def regmean_merge(
    thetas: Sequence[dict[str, torch.Tensor]],
    grams: Sequence[GramSet],
    coeffs: np.ndarray,
    layers: dict[str, nn.Linear | nn.Conv2d],
    alpha: float = DEFAULT_ALPHA,
) -> dict[str, torch.Tensor]:
    """Merge k state dicts; `layers` (name → module of the architecture) says which keys are linear maps."""
    a = np.asarray(coeffs, dtype=np.float64)
    if a.shape != (len(thetas),) or len(grams) != len(thetas):
        raise ValueError(f"need one coefficient and one Gram set per member: {len(thetas)} members, {a.shape}")
    merged = {key: _weighted_mean([t[key] for t in thetas], a) for key in thetas[0]}
    for name, layer in layers.items():
        wkey, bkey = f"{name}.weight", f"{name}.bias"
        has_bias = layer.bias is not None
        lhs = torch.zeros_like(grams[0].grams[name])
        rhs = torch.zeros(lhs.shape[0], layer.weight.shape[0], dtype=torch.float64)
        for w, theta, gram in zip(a, thetas, grams, strict=True):
            g = float(w) * _shrink(gram.grams[name], alpha)
            lhs += g
            rhs += g @ _stacked(theta[wkey], theta[bkey] if has_bias else None)
        mean = _stacked(merged[wkey], merged[bkey] if has_bias else None)
        if not has_bias:  # no bias to fit: drop the ones column
            lhs, rhs, mean = lhs[:-1, :-1], rhs[:-1], mean[:-1]
        solved = _solve(lhs, rhs, mean).T  # (d_out, d_in [+ 1])
        d_in = solved.shape[1] - (1 if has_bias else 0)
        merged[wkey] = solved[:, :d_in].reshape(thetas[0][wkey].shape).float()
        if has_bias:
            merged[bkey] = solved[:, d_in].float()
    return merged


def _solve(lhs: torch.Tensor, rhs: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(lhs + λI)⁻¹ (rhs + λ·mean): a tiny ridge toward the weighted average (λ = 1e-6 of the mean
    diagonal), so inputs the calibration set never excites (dead ReLUs: zero rows of G) keep the
    averaged weights instead of making the system singular, as FedFisher's fallback does for COIN."""
    ridge = 1e-6 * torch.diagonal(lhs).mean().clamp_min(1e-30)
    eye = torch.eye(len(lhs), dtype=lhs.dtype)
    return torch.linalg.solve(lhs + ridge * eye, rhs + ridge * mean)
