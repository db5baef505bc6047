"""The two architectures we serve: a small CNN and an MLP for 28×28 inputs.

Both are plain `nn.Sequential` stacks of Conv2d, ReLU, MaxPool2d, Flatten and Linear only: the
layers the bit-plane refinement engine (models/refine.py) knows how to upgrade incrementally.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from models.data import IMAGE_SHAPE, NUM_CLASSES


@dataclass(frozen=True)
class CNNConfig:
    """conv(c1) → pool → conv(c2) → pool → fc(hidden) → fc(classes); 3×3 kernels, same padding."""

    channels: tuple[int, int] = (16, 32)
    hidden: int = 128
    classes: int = NUM_CLASSES


@dataclass(frozen=True)
class MLPConfig:
    hidden: tuple[int, ...] = field(default=(256, 128))
    classes: int = NUM_CLASSES


ARCHITECTURES = ("cnn", "mlp")


def build_cnn(cfg: CNNConfig) -> nn.Sequential:
    c1, c2 = cfg.channels
    side = IMAGE_SHAPE[1] // 4  # two 2×2 pools: 28 → 14 → 7
    return nn.Sequential(
        nn.Conv2d(IMAGE_SHAPE[0], c1, 3, padding=1),  # (B, c1, 28, 28)
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, c1, 14, 14)
        nn.Conv2d(c1, c2, 3, padding=1),  # (B, c2, 14, 14)
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, c2, 7, 7)
        nn.Flatten(),  # (B, c2*49)
        nn.Linear(c2 * side * side, cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.classes),  # (B, C) logits
    )


def build_mlp(cfg: MLPConfig) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]  # (B, 784)
    width = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    for hidden in cfg.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, cfg.classes))  # (B, C) logits
    return nn.Sequential(*layers)


def config_from_dict(architecture: str, values: dict[str, Any]) -> CNNConfig | MLPConfig:
    """Rebuild a config from its manifest form (tuples arrive as JSON lists)."""
    if architecture == "cnn":
        return CNNConfig(
            channels=tuple(values["channels"]), hidden=int(values["hidden"]), classes=int(values["classes"])
        )
    if architecture == "mlp":
        return MLPConfig(hidden=tuple(values["hidden"]), classes=int(values["classes"]))
    raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")


def config_to_dict(cfg: CNNConfig | MLPConfig) -> dict[str, Any]:
    return asdict(cfg)


def build(architecture: str, cfg: CNNConfig | MLPConfig) -> nn.Sequential:
    if architecture == "cnn" and isinstance(cfg, CNNConfig):
        return build_cnn(cfg)
    if architecture == "mlp" and isinstance(cfg, MLPConfig):
        return build_mlp(cfg)
    raise ValueError(f"architecture {architecture!r} does not match config {type(cfg).__name__}")


def default_config(architecture: str) -> CNNConfig | MLPConfig:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
    return CNNConfig() if architecture == "cnn" else MLPConfig()


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Softmax outputs (N, C) in eval mode, in chunks so memory stays flat."""
    model.eval()
    parts = [torch.softmax(model(images[i : i + batch_size]), dim=1) for i in range(0, len(images), batch_size)]
    return torch.cat(parts)
