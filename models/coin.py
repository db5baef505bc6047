"""COIN coded models: Fisher-weighted merging of k members, and the plain-average baseline.

θ_c = Σ_i a_i F_i θ_i / Σ_i a_i F_i elementwise (DESIGN §1.1): the minimiser of the second-order
expansion of Σ_i a_i KL(p_θi ‖ p_θ) around each θ_i with diagonal Fisher F_i. Where Σ_i a_i F_i is
negligible the data says nothing about that coordinate, and we fall back to the weighted mean
Σ_i a_i θ_i (as FedFisher does). Plain parameter averaging is the special case F_i = 1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.fisher import FisherKind, diagonal_fisher

NEGLIGIBLE = 1e-6  # relative to the tensor's mean Σ a_i F_i; below it a coordinate falls back to Σ a_i θ_i


def fisher_merge(
    thetas: Sequence[dict[str, torch.Tensor]],
    fishers: Sequence[dict[str, torch.Tensor]] | None,
    coeffs: np.ndarray,
) -> dict[str, torch.Tensor]:
    """Merge k state dicts with weights `coeffs` (k,); `fishers=None` gives the plain weighted average."""
    a = np.asarray(coeffs, dtype=np.float64)
    if a.shape != (len(thetas),):
        raise ValueError(f"need one coefficient per member: {len(thetas)} members, coefficients of shape {a.shape}")
    merged: dict[str, torch.Tensor] = {}
    for key in thetas[0]:
        theta = torch.stack([t[key].double() for t in thetas])  # (k, *shape)
        w = torch.tensor(a, dtype=torch.float64).view(-1, *([1] * (theta.dim() - 1)))
        mean = (w * theta).sum(0)
        if fishers is None:
            merged[key] = mean.float()
            continue
        weighted = w * torch.stack([f[key].double() for f in fishers])  # a_i F_i
        den = weighted.sum(0)
        ok = den > NEGLIGIBLE * den.mean().clamp_min(1e-300)
        merged[key] = torch.where(ok, (weighted * theta).sum(0) / torch.where(ok, den, 1.0), mean).float()
    return merged


@dataclass(frozen=True)
class FisherSet:
    """Fishers of members computed once and reused for every k, r and coefficient row."""

    fishers: list[dict[str, torch.Tensor]]
    seconds: list[float]
    kind: FisherKind
    images: int


def compute_fishers(
    members: Sequence[nn.Module],
    calibration: torch.Tensor,
    labels: torch.Tensor | None = None,
    kind: FisherKind = "true",
) -> FisherSet:
    fishers, seconds = [], []
    for member in members:
        start = time.process_time()
        fishers.append(diagonal_fisher(member, calibration, labels, kind=kind))
        seconds.append(time.process_time() - start)
    return FisherSet(fishers, seconds, kind, len(calibration))


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, lo: float = 0.05, hi: float = 4.0) -> float:
    """T minimising E_x KL(target ‖ softmax(logits / T)): COIN's barycenter objective over one scalar.

    Cross-entropy is convex in β = 1/T (log-sum-exp of a linear function), so a golden-section search
    over β finds the optimum; 60 iterations shrink the bracket below 1e-12.
    """

    def loss(beta: float) -> float:
        return float(-(target * torch.log_softmax(logits.double() * beta, dim=1)).sum(1).mean())

    golden = (5**0.5 - 1) / 2
    a, b = 1.0 / hi, 1.0 / lo
    c, d = b - golden * (b - a), a + golden * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - golden * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + golden * (b - a)
            fd = loss(d)
    return 1.0 / ((a + b) / 2)


def apply_temperature(model: nn.Module, temperature: float) -> nn.Module:
    """Fold 1/T into the final Linear layer, so the coded model stays an ordinary network."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.div_(temperature)
        last.bias.div_(temperature)
    return model
