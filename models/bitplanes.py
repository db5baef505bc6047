"""Sign-magnitude bit-planes, most significant first, and the refinement plan (DESIGN §1.2).

A value v with top exponent p0 (2^p0 > |v|) truncated to r planes keeps the magnitude bits
2^(p0-1) … 2^(p0-r): trunc_r(v) = sign(v) · floor(|v| / 2^(p0-r)) · 2^(p0-r), i.e. truncation
toward zero onto the grid 2^(p0-r). Every operation is a power-of-two scaling, a floor and a
product of small integers by a power of two, so it is exact in float32. Plane r's increment is
trunc_r − trunc_{r-1}; the increments of planes 1..r sum to trunc_r exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from models.errors import RefinementError


def top_exponent(v: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """Smallest p0 with 2^p0 > max|v|: per tensor, or per output channel (dim 0) when `per_channel`.

    The result broadcasts against v. An all-zero tensor (or channel) gets p0 = 0.
    """
    if per_channel and v.dim() > 1:
        peak = v.detach().abs().flatten(1).amax(1).view(-1, *([1] * (v.dim() - 1)))
    else:
        peak = v.detach().abs().amax()
    p0 = torch.floor(torch.log2(peak)) + 1
    return torch.where(peak > 0, p0, torch.zeros_like(p0))


def row_exponent(x: torch.Tensor) -> torch.Tensor:
    """Per-sample top exponent of an input batch (B, ...): a request's planes never depend on its batch-mates."""
    peak = x.detach().abs().flatten(1).amax(1).view(-1, *([1] * (x.dim() - 1)))
    p0 = torch.floor(torch.log2(peak)) + 1
    return torch.where(peak > 0, p0, torch.zeros_like(p0))


def truncate(v: torch.Tensor, planes: int, p0: torch.Tensor) -> torch.Tensor:
    """v truncated toward zero to its top `planes` magnitude bits below 2^p0."""
    if planes < 0:
        raise RefinementError(f"planes must be >= 0, got {planes}")
    step = torch.pow(2.0, p0 - planes).to(v.dtype)
    return torch.trunc(v / step) * step  # trunc rounds toward zero: sign(v)·floor(|v|/step)


def plane(v: torch.Tensor, r: int, p0: torch.Tensor) -> torch.Tensor:
    """The increment of plane r (1-based): trunc_r(v) − trunc_{r-1}(v), one bit per element."""
    return truncate(v, r, p0) - truncate(v, r - 1, p0)


def decompose(v: torch.Tensor, planes: int, p0: torch.Tensor) -> list[torch.Tensor]:
    """[plane 1, …, plane `planes`]; their sum is truncate(v, planes, p0)."""
    return [plane(v, r, p0) for r in range(1, planes + 1)]


FULL = None  # the last resolution of every plan: the unmodified float32 model


@dataclass(frozen=True)
class RefinementPlan:
    """The served resolutions: planes per resolution (strictly increasing), then float32.

    `per_channel` gives every output channel of a weight its own top exponent (biases and inputs
    use one per tensor / per sample). Measured on the default CNN at 4 planes: 88.6% per channel
    against 83.5% per tensor (full model 89.7%); docs/refinement.md.
    """

    planes: tuple[int, ...] = (4,)
    per_channel: bool = True
    grid: tuple[int, ...] | None = None  # activation exponents per hidden layer: coarse resolutions in int8

    def __post_init__(self) -> None:
        if any(p < 1 for p in self.planes) or list(self.planes) != sorted(set(self.planes)):
            raise RefinementError(f"plan planes must be strictly increasing positive integers, got {self.planes}")
        if self.grid is not None and not all(type(g) is int and -24 <= g <= 24 for g in self.grid):
            raise RefinementError(f"plan grid must list integer exponents in -24..24, got {self.grid}")
        if self.grid is not None and not self.per_channel:
            raise RefinementError("an integer plan (grid) has per-channel weight exponents")

    @property
    def integer(self) -> bool:
        """Coarse resolutions on int8 kernels (models/int8.py) where the model and planes allow."""
        return self.grid is not None

    @property
    def resolutions(self) -> int:
        """How many resolutions are served, the float32 one included."""
        return len(self.planes) + 1

    def planes_at(self, index: int) -> int | None:
        """Planes of resolution `index` (0-based); None for the final float32 resolution."""
        if not 0 <= index < self.resolutions:
            raise RefinementError(f"resolution {index} is outside 0..{self.resolutions - 1}")
        return self.planes[index] if index < len(self.planes) else FULL

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"planes": list(self.planes), "per_channel": self.per_channel, "final": "float32"}
        if self.grid is not None:
            out["grid"] = list(self.grid)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> RefinementPlan:
        if not values:
            return cls()
        grid = values.get("grid")
        return cls(
            planes=tuple(int(p) for p in values["planes"]),
            per_channel=bool(values.get("per_channel", True)),
            grid=None if grid is None else tuple(int(g) for g in grid),
        )

    @classmethod
    def parse(cls, text: str, per_channel: bool = True) -> RefinementPlan:
        """'3,4,5,6,8' or '4,full' (the trailing float32 resolution is implied either way)."""
        items = [t.strip() for t in text.split(",") if t.strip() and t.strip() != "full"]
        try:
            return cls(planes=tuple(int(t) for t in items), per_channel=per_channel)
        except ValueError as exc:
            raise RefinementError(f"plan {text!r} must list plane counts like '4,6,full'") from exc
