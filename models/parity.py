"""ParM-style learned parity model, the trained baseline COIN is measured against.

Kosaian et al. (SOSP'19) train a parity network of the base architecture from a fresh
initialisation, with an MSE loss, to output the code of the members' outputs. COIN codes over
models rather than queries, so our parity model sees the same query x and is trained to output
Σ_i a_i p_i(x): MSE between its softmax output and the mixture, over the training split. Its
wall-clock training time (targets included) is recorded so the build costs can be compared.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from models.data import Split
from models.fitting import fit
from models.networks import predict_proba

MIN_STEPS = 200  # 6 epochs of Fashion-MNIST are ~5,000 steps; 6 of an imported bundle's 269 inputs only 24


def mixture_targets(members: Sequence[nn.Module], images: torch.Tensor, coeffs: np.ndarray) -> torch.Tensor:
    """Σ_i a_i p_i(x) for every image: (N, C)."""
    probs = torch.stack([predict_proba(m, images) for m in members])  # (k, N, C)
    a = torch.tensor(np.asarray(coeffs), dtype=probs.dtype).view(-1, 1, 1)
    return (a * probs).sum(0)


def train_parity(
    fresh: Callable[[], nn.Module],
    members: Sequence[nn.Module],
    train: np.ndarray,
    coeffs: np.ndarray,
    epochs: int = 6,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[nn.Module, float]:
    """Returns the parity model and its training seconds (targets + optimisation).

    Adam lr 1e-3, weight decay 1e-5 and minibatch 64 as in ParM's trainer; our epoch budget is
    small next to ParM's 500 because the comparison is about cost (docs/coin.md).
    """
    start = time.process_time()
    images = torch.from_numpy(train)
    targets = mixture_targets(members, images, coeffs)
    torch.manual_seed(seed)
    model = fresh()  # fresh initialisation of the members' architecture, as ParM
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    steps = max(epochs * max(1, len(train) // batch_size), MIN_STEPS)  # a small imported set: still trained
    soft = Split(train, np.arange(len(train)))  # labels carry row indices into `targets`

    def loss(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(torch.softmax(logits, dim=1), targets[rows])

    fit(model, soft, steps, optimizer, batch_size, seed, desc="parity", loss_fn=loss)
    return model.eval(), time.process_time() - start
