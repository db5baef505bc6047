"""Barycenter distillation: a few Adam steps taking a merged coded model toward Σ a_i p_i.

The coded model must output the mixture Σ_i a_i p_i(x), the minimiser of Σ_i a_i KL(p_i ‖ q)
(DESIGN §1.1). A parameter merge only approximates it to second order; here we minimise the
objective itself, KL(Σ a_i p_i ‖ p_c), by gradient steps on unlabelled calibration inputs, starting
from the merged parameters (so a handful of steps suffice, unlike the parity model's fresh start).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from models.data import Split
from models.fitting import fit

LOSSES = ("kl", "mse")


@dataclass(frozen=True)
class DistillConfig:
    """Defaults chosen on the validation split (docs/coin.md)."""

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 128
    loss: str = "mse"  # "kl": KL(Σ a_i p_i ‖ p_c); "mse": ‖p_c − Σ a_i p_i‖², the error the decoder amplifies
    seed: int = 0


def distill(model: nn.Module, images: torch.Tensor, mixture: torch.Tensor, cfg: DistillConfig) -> dict[str, float]:
    """Train `model` in place on (images (N, 1, 28, 28), mixture (N, C)); returns steps, CPU seconds, final loss."""
    start = time.process_time()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    soft = Split(images.numpy(), torch.arange(len(images)).numpy())  # labels carry row indices into `mixture`
    log_target = torch.log(mixture.clamp_min(1e-12))

    def kl(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        p = mixture[rows]
        return (p * (log_target[rows] - torch.log_softmax(logits, dim=1))).sum(1).mean()  # KL(mixture ‖ p_c)

    def mse(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return ((torch.softmax(logits, dim=1) - mixture[rows]) ** 2).sum(1).mean()

    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown distillation loss {cfg.loss!r}; expected one of {LOSSES}")
    torch.manual_seed(cfg.seed)
    loss_fn = kl if cfg.loss == "kl" else mse
    loss = fit(model, soft, cfg.steps, optimizer, cfg.batch_size, cfg.seed, desc="distill", loss_fn=loss_fn)
    return {"steps": cfg.steps, "seconds": round(time.process_time() - start, 3), "final_loss": round(loss, 6)}
