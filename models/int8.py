"""Integer coarse resolutions: r bit-planes computed with int8 kernels, and their exact reference.

At r planes every weight is an integer |k| < 2^r times its output channel's power of two, and every
input element an integer times its row's power of two (models/bitplanes.py). An int8 kernel computes
such a layer exactly: int8 × int8 products summed in int32. Between layers the activations are
re-quantised onto a power-of-two grid 2^g (8 bits, unsigned after the ReLU), as the paper's code does
(2⁻⁴ on MNIST); the plan's `grid` holds one exponent g per hidden layer, chosen on validation.

The reference of resolution r (docs/refinement.md, "Integer resolutions"), for a batch of rows that
share the input exponent p0 (rows are grouped by it, so a request never depends on its batch-mates):

    q0      = trunc(x / 2^(p0-r))                        integers, |q0| < 2^r
    for each hidden conv/linear layer l with input scale s, weights W_l = w_l · 2^(e_l,c), |w_l| < 2^r:
        acc   = Σ q · w_l                                 exact integer sum
        β_c   = rint(trunc_r(b_l,c) / (s · 2^(e_l,c)))    the truncated bias on the accumulator grid
        q'    = clamp(rint(f32(f32(acc) + β_c) · 2^(e_l,c) · s / 2^g_l), 0, 255)
        (max-pool and flatten act on the integers), s ← 2^g_l
    logits  = f32(f32(acc) · s · 2^(e_c)) + trunc_r(b_c)  for the last layer, in float32

rint is round-half-to-even; f32(·) is rounding to float32, which is exact whenever |acc| < 2^24 (every
layer of the shipped networks at r ≤ 6) and otherwise matches the kernels' own int32 → float32 step.
The last layer runs as a float32 GEMM of integer-valued operands: exact, since its partial sums stay
below 2^24. `reference_logits` computes all of this in plain numpy integers; `IntResolution.forward`
with PyTorch's quantized kernels; tests check they are bit-identical.

Weights are limited to MAX_PLANES = 6 planes: AVX2 kernels without VNNI add pairs of u8 × s8
products in a saturating int16 (vpmaddubsw); 2 · 255 · 63 = 32130 fits, 2 · 255 · 127 does not.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.bitplanes import row_exponent, top_exponent, truncate
from models.errors import RefinementError

logger = logging.getLogger(__name__)

MAX_PLANES = 6
ENGINES = ("x86", "onednn", "fbgemm")  # PyTorch's int8 CPU engines, in the order tried
INPUT_ZERO_POINT = 128  # the input is signed: q0 + 128 in quint8 (|q0| ≤ 63 at 6 planes)


@dataclass(frozen=True)
class _Layer:
    kind: str  # "conv" | "linear"
    weight: torch.Tensor  # (out, ...) int8-valued integers, as float32 (exact)
    exponents: torch.Tensor  # (out,) int64: the weight of channel c is weight[c] · 2^exponents[c]
    bias: torch.Tensor  # (out,) float32: the bias truncated to r planes
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    pool_after: bool = False  # a 2×2/2 max-pool follows (after the fused ReLU)
    flatten_before: bool = False


def program(model: nn.Module) -> list[tuple[str, nn.Module]] | str:
    """The integer program of a Sequential model, or the reason it has none.

    Supported: [Flatten] then conv/linear layers, each but the last followed by ReLU (fused into it)
    and optionally a 2×2/2 max-pool, a Flatten between the convolutions and the linear layers.
    """
    modules = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    steps: list[tuple[str, nn.Module]] = []
    i = 0
    while i < len(modules):
        m = modules[i]
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                return f"{m} does not flatten everything after the batch dimension"
            steps.append(("flatten", m))
        elif isinstance(m, nn.Conv2d | nn.Linear):
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros"):
                return f"{m}: only plain convolutions (no groups, dilation or padding modes) have int8 kernels here"
            if m.bias is None:
                return f"{m} has no bias"
            steps.append(("conv" if isinstance(m, nn.Conv2d) else "linear", m))
        elif isinstance(m, nn.ReLU):
            if not steps or steps[-1][0] not in ("conv", "linear"):
                return "a ReLU must follow a convolution or linear layer directly"
            steps.append(("relu", m))
        elif isinstance(m, nn.MaxPool2d):
            plain = m.kernel_size in (2, (2, 2)) and m.stride in (2, (2, 2)) and m.padding in (0, (0, 0))
            if not plain or m.dilation not in (1, (1, 1)) or m.ceil_mode or not steps or steps[-1][0] != "relu":
                return f"{m}: only a 2×2/2 max-pool after a ReLU"
            steps.append(("pool", m))
        else:
            return f"{type(m).__name__} has no int8 kernel here"
        i += 1
    layers = [k for k, _ in steps if k in ("conv", "linear")]
    if not layers:
        return "no convolution or linear layer"
    kinds = [k for k, _ in steps]
    for j, (kind, _) in enumerate(steps):
        is_last_layer = kind in ("conv", "linear") and j == max(
            i for i, k in enumerate(kinds) if k in ("conv", "linear")
        )
        if kind in ("conv", "linear") and not is_last_layer and (j + 1 >= len(steps) or steps[j + 1][0] != "relu"):
            return "every layer but the last must be followed by a ReLU"
        if is_last_layer and (kind != "linear" or j != len(steps) - 1):
            return "the last layer must be a linear layer giving the logits"
    return steps


def hidden_layers(model: nn.Module) -> int:
    """How many grid exponents a plan needs for this model (its conv/linear layers but the last)."""
    steps = program(model)
    if isinstance(steps, str):
        raise RefinementError(f"no integer resolution for this model: {steps}")
    return sum(1 for kind, _ in steps if kind in ("conv", "linear")) - 1


def unsupported(model: nn.Module, planes: int) -> str | None:
    """Why resolution `planes` of this model cannot be computed with int8 kernels (None: it can)."""
    if not 1 <= planes <= MAX_PLANES:
        return f"{planes} planes: int8 resolutions take 1..{MAX_PLANES} planes"
    steps = program(model)
    return steps if isinstance(steps, str) else None


def _exponent(t: torch.Tensor) -> torch.Tensor:
    return t.flatten().to(torch.int64)


class IntResolution:
    """One coarse resolution of a model on int8 kernels; weights packed once per input exponent."""

    def __init__(self, model: nn.Module, planes: int, grid: Sequence[int], engine: str) -> None:
        why = unsupported(model, planes)
        if why is not None:
            raise RefinementError(why)
        steps = program(model)
        assert not isinstance(steps, str)
        self.planes = planes
        self.engine = engine
        self.layers: list[_Layer] = []
        flatten = False
        for kind, m in steps:
            if kind == "flatten":
                flatten = True
            elif kind == "pool":
                self.layers[-1] = _with(self.layers[-1], pool_after=True)
            elif kind in ("conv", "linear"):
                assert isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None
                w = m.weight.detach().float()
                b = m.bias.detach().float()
                p0 = top_exponent(w, per_channel=True)
                step_exp = (p0 - planes).flatten()
                ints = truncate(w, planes, p0) / torch.pow(2.0, p0 - planes)
                self.layers.append(
                    _Layer(
                        kind,
                        ints.contiguous(),
                        _exponent(step_exp),
                        truncate(b, planes, top_exponent(b)),
                        tuple(m.stride) if kind == "conv" else (1, 1),  # type: ignore[arg-type]
                        tuple(m.padding) if kind == "conv" else (0, 0),  # type: ignore[arg-type]
                        flatten_before=flatten,
                    )
                )
                flatten = False
        if len(grid) != len(self.layers) - 1:
            raise RefinementError(
                f"the plan's grid has {len(grid)} exponents; this model has {len(self.layers) - 1} hidden layers"
            )
        self.grid = tuple(int(g) for g in grid)
        self._packed: dict[int, tuple[list[Any], torch.Tensor]] = {}  # input exponent → (layers, logit scales)

    # -- the served pass -------------------------------------------------------------------

    def _pack(self, input_exponent: int) -> tuple[list[Any], torch.Tensor]:
        packed = self._packed.get(input_exponent)
        if packed is not None:
            return packed
        torch.backends.quantized.engine = self.engine
        with warnings.catch_warnings():  # PyTorch 2.13 marks quantized tensor creation deprecated
            warnings.simplefilter("ignore", UserWarning)
            return self._pack_layers(input_exponent)

    def _pack_layers(self, input_exponent: int) -> tuple[list[Any], torch.Tensor]:
        packed: list[Any] = []
        scale_exp = input_exponent
        for layer in self.layers[:-1]:
            qw = torch._make_per_channel_quantized_tensor(
                layer.weight.to(torch.int8),
                torch.pow(2.0, layer.exponents.double()),
                torch.zeros_like(layer.exponents),
                0,
            )
            acc_exp = layer.exponents + scale_exp  # the accumulator grid of every output channel
            bias = torch.round(layer.bias.double() / torch.pow(2.0, acc_exp.double())) * torch.pow(
                2.0, acc_exp.double()
            )
            if layer.kind == "conv":
                packed.append(
                    torch.ops.quantized.conv2d_prepack(
                        qw, bias.float(), list(layer.stride), list(layer.padding), [1, 1], 1
                    )
                )
            else:
                packed.append(torch.ops.quantized.linear_prepack(qw, bias.float()))
            scale_exp = self.grid[len(packed) - 1]
        scales = torch.pow(2.0, (self.layers[-1].exponents + scale_exp).float())  # the last layer's logit grid
        self._packed[input_exponent] = (packed, scales)
        return packed, scales

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) in float32; rows grouped by their input exponent."""
        flat = x.reshape(len(x), -1)
        peak = torch.maximum(flat.amax(1), flat.amin(1).neg())
        p0 = torch.where(peak > 0, torch.floor(torch.log2(peak)) + 1, torch.zeros_like(peak)).to(torch.int64)
        first = int(p0[0])
        if bool((p0 == first).all()):
            return self._forward_group(x, first)
        out = torch.empty(len(x), self.layers[-1].weight.shape[0])
        for value in p0.unique().tolist():
            rows = (p0 == value).nonzero().flatten()
            out[rows] = self._forward_group(x[rows], int(value))
        return out

    def _forward_group(self, x: torch.Tensor, p0: int) -> torch.Tensor:
        return self.run(self.quantize_input(x, p0), p0)

    def quantize_input(self, x: torch.Tensor, p0: int) -> torch.Tensor:
        """Rows sharing input exponent p0 as the first layer's quint8 input (depends on planes only)."""
        self._pack(p0 - self.planes)  # first: PyTorch's once-per-process deprecation warning is silenced there
        scale = 2.0 ** (p0 - self.planes)
        q = x.mul(1.0 / scale).trunc_().add_(INPUT_ZERO_POINT).to(torch.uint8)
        return torch._make_per_tensor_quantized_tensor(q, scale, INPUT_ZERO_POINT)

    def run(self, h: torch.Tensor, p0: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Hidden layers start..stop-1 on `h` (the input of layer `start`); with `stop` None, on to the
        logits. The input of layer l depends on the grid's first l exponents only: the grid search
        (models/selection.py) keeps it and runs only the layers a trial exponent changes."""
        if torch.backends.quantized.engine != self.engine:
            torch.backends.quantized.engine = self.engine
        packed, scales = self._pack(p0 - self.planes)
        hidden = len(self.layers) - 1
        for i in range(start, hidden if stop is None else stop):
            layer, g = self.layers[i], self.grid[i]
            if layer.flatten_before:
                h = h.reshape(len(h), -1)
            if layer.kind == "conv":
                h = torch.ops.quantized.conv2d_relu(h, packed[i], 2.0**g, 0)
            else:
                h = torch.ops.quantized.linear_relu(h, packed[i], 2.0**g, 0)
            if layer.pool_after:
                h = _pool(h, 2.0**g)
        if stop is not None:
            return h
        last = self.layers[-1]
        if last.flatten_before:
            h = h.reshape(len(h), -1)
        ints = h.int_repr().float()  # exact: integers 0..255
        acc = F.linear(ints, last.weight)  # integer-valued, exact below 2^24
        return acc * scales + last.bias

    # -- the reference ---------------------------------------------------------------------

    def reference_logits(self, x: np.ndarray) -> np.ndarray:
        """The same logits from plain numpy integers (slow; tests and the start-up check)."""
        out = np.empty((len(x), self.layers[-1].weight.shape[0]), np.float32)
        p0 = row_exponent(torch.from_numpy(x)).flatten().to(torch.int64).numpy()
        for value in np.unique(p0):
            rows = np.flatnonzero(p0 == value)
            out[rows] = self._reference_group(x[rows], int(value))
        return out

    def _reference_group(self, x: np.ndarray, p0: int) -> np.ndarray:
        shift = p0 - self.planes
        q = np.trunc(x.astype(np.float32) / np.float32(2.0**shift)).astype(np.int64)
        scale_exp = shift
        for layer, g in zip(self.layers[:-1], self.grid, strict=True):
            w = layer.weight.numpy().astype(np.int64)
            e = layer.exponents.numpy()
            if layer.flatten_before:
                q = q.reshape(len(q), -1)
            acc = _conv_int(q, w, layer.stride, layer.padding) if layer.kind == "conv" else q @ w.T
            acc_exp = e + scale_exp
            beta = np.rint(layer.bias.numpy().astype(np.float64) / np.exp2(acc_exp.astype(np.float64)))
            shape = (1, -1, 1, 1) if layer.kind == "conv" else (1, -1)
            total = acc.astype(np.float32) + beta.astype(np.float32).reshape(shape)  # f32(f32(acc) + β)
            scaled = total.astype(np.float64) * np.exp2((acc_exp - g).astype(np.float64)).reshape(shape)
            q = np.clip(np.rint(scaled), 0, 255).astype(np.int64)
            if layer.pool_after:
                q = _max_pool_int(q)
            scale_exp = g
        last = self.layers[-1]
        if last.flatten_before:
            q = q.reshape(len(q), -1)
        acc = (q @ last.weight.numpy().astype(np.int64).T).astype(np.float32)
        factor = np.exp2((last.exponents.numpy() + scale_exp).astype(np.float32))
        return (acc * factor + last.bias.numpy()).astype(np.float32)


def _pool(h: torch.Tensor, scale: float) -> torch.Tensor:
    """2×2/2 max-pool of a quint8 NHWC tensor. PyTorch's quantized max-pool is slow for narrow rows
    of channels: at (64, 16, 28, 28) it took 324 µs against 163 µs for the max of four strided views
    of the integers (int_repr included); at (64, 64, 28, 28) 80 µs against 644 µs; at batch 1 8 µs
    against 19 µs (AMD EPYC, 2 threads). Both are exact."""
    if h.shape[1] >= 32 or len(h) <= 8:
        return F.max_pool2d(h, 2)
    return torch._make_per_tensor_quantized_tensor(max_pool_2x2(h.int_repr()), scale, 0)


def _with(layer: _Layer, **changes: Any) -> _Layer:
    from dataclasses import replace

    return replace(layer, **changes)


def _conv_int(q: np.ndarray, w: np.ndarray, stride: tuple[int, int], padding: tuple[int, int]) -> np.ndarray:
    """Integer cross-correlation (B, Ci, H, W) * (Co, Ci, kh, kw) → (B, Co, H', W') by im2col."""
    b, ci, h, wd = q.shape
    co, _, kh, kw = w.shape
    ph, pw = padding
    sh, sw = stride
    padded = np.pad(q, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    cols = np.empty((b, ci, kh, kw, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = padded[:, :, i : i + sh * oh : sh, j : j + sw * ow : sw]
    out = np.einsum("bcijhw,ocij->bohw", cols, w, optimize=True)
    return out


def max_pool_2x2(h: torch.Tensor) -> torch.Tensor:
    """2×2/2 max-pool as the max of four strided views: 0.49 ms against 3.2 ms for F.max_pool2d
    on a (64, 16, 28, 28) NCHW tensor on the reference CPU; bit-identical (max is exact); any dtype
    (uint8 for the integer resolutions)."""
    h = h[..., : h.shape[-2] // 2 * 2, : h.shape[-1] // 2 * 2]
    top = torch.maximum(h[..., 0::2, 0::2], h[..., 0::2, 1::2])
    return torch.maximum(top, torch.maximum(h[..., 1::2, 0::2], h[..., 1::2, 1::2]))


def _max_pool_int(q: np.ndarray) -> np.ndarray:
    h, w = q.shape[-2] // 2 * 2, q.shape[-1] // 2 * 2
    q = q[..., :h, :w]
    return np.maximum(
        np.maximum(q[..., 0::2, 0::2], q[..., 0::2, 1::2]), np.maximum(q[..., 1::2, 0::2], q[..., 1::2, 1::2])
    )


def available_engines() -> list[str]:
    return [e for e in ENGINES if e in torch.backends.quantized.supported_engines]


def candidates(
    model: nn.Module, planes: int, grid: Sequence[int], check: torch.Tensor
) -> tuple[dict[str, IntResolution], dict[str, str]]:
    """Every available engine's resolution that reproduces the integer reference exactly on `check`,
    and why each other engine was refused. The worker times the candidates again in idle moments
    (workers/costs.py): a choice timed while several workers start on the same cores is noise."""
    usable: dict[str, IntResolution] = {}
    refused: dict[str, str] = {}
    for engine in available_engines():
        try:
            res = IntResolution(model, planes, grid, engine)
            got = res.forward(check).numpy()
            want = res.reference_logits(check.numpy())
            if not np.array_equal(got, want):
                refused[engine] = f"differs from the integer reference (max |Δ| {float(np.abs(got - want).max()):.3g})"
                continue
            usable[engine] = res
        except (RuntimeError, RefinementError) as exc:
            refused[engine] = f"failed: {exc}"
    return usable, refused


def choose_engine(
    model: nn.Module, planes: int, grid: Sequence[int], sample: torch.Tensor, repeats: int = 30
) -> tuple[str | None, dict[str, Any]]:
    """The fastest int8 engine on `sample` among those that reproduce the reference exactly on it.

    Returns (engine or None, {engine: median ms or the reason it was refused}).
    """
    usable, refused = candidates(model, planes, grid, sample[: min(len(sample), 4)])
    report: dict[str, Any] = dict(refused)
    best: tuple[float, str] | None = None
    for engine, res in usable.items():
        for _ in range(5):
            res.forward(sample)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            res.forward(sample)
            times.append(time.perf_counter() - start)
        ms = float(np.median(times)) * 1000
        report[engine] = round(ms, 4)
        best = (ms, engine) if best is None or ms < best[0] else best
    return (best[1] if best else None), {e: report[e] for e in available_engines() if e in report}
