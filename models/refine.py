"""Successive refinement engine: resolution by resolution, truncated to bit-planes, exact at the end.

Resolution i of a plan uses the top `plan.planes[i]` planes of every weight, bias and input
element; its output equals an ordinary forward pass of the truncated model (`reference`). The last
resolution is the unmodified float32 model. Two ways to get there, both exact:

- `forward(x, i)`: a direct pass with the truncated weights (cached per resolution), on
  channels_last tensors with ReLU moved after max-pool (they commute). The same optimised pass
  computes the float32 resolution, so the one-shot baseline we compare with is just as fast.
- `begin` / `upgrade`: the paper's incremental update per layer,
  ΔZ = A_old·ΔH + ΔA·(H_old + ΔH), ReLU and max-pool increments from the stored old activations.
  Per-request state is one copy of the forward pass's activations.

Which one serves is measured, not assumed (docs/refinement.md): in float32 on this CPU the direct
pass wins, because an incremental step costs two GEMMs per layer where a direct pass costs one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import int8
from models.bitplanes import RefinementPlan, row_exponent, top_exponent, truncate
from models.errors import RefinementError
from models.int8 import IntResolution, max_pool_2x2 as _max_pool_2x2

logger = logging.getLogger(__name__)

_SUPPORTED = (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten)


@dataclass(frozen=True)
class _Op:
    kind: str  # "conv" | "linear" | "relu" | "pool" (max) | "avgpool" | "flatten"
    module: nn.Module
    param_index: int = -1  # index into the per-resolution weight lists, for conv/linear


def _compile(model: nn.Module) -> list[_Op]:
    modules = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    ops: list[_Op] = []
    params = 0
    for module in modules:
        if not isinstance(module, _SUPPORTED):
            raise RefinementError(f"the refinement engine supports {[c.__name__ for c in _SUPPORTED]}, not {module}")
        if isinstance(module, nn.Conv2d | nn.Linear):
            ops.append(_Op("conv" if isinstance(module, nn.Conv2d) else "linear", module, params))
            params += 1
        else:
            kind = {nn.ReLU: "relu", nn.MaxPool2d: "pool", nn.AvgPool2d: "avgpool", nn.Flatten: "flatten"}[type(module)]
            ops.append(_Op(kind, module))
    return ops


def _apply(
    op: _Op, h: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    m = op.module
    if op.kind == "conv":
        assert isinstance(m, nn.Conv2d)
        return F.conv2d(h, weight, bias, m.stride, m.padding, m.dilation, m.groups)  # type: ignore[arg-type]
    if op.kind == "linear":
        return F.linear(h, weight, bias)  # type: ignore[arg-type]
    if op.kind == "relu":
        return F.relu(h)
    if op.kind == "pool":
        assert isinstance(m, nn.MaxPool2d)
        if _is_plain_2x2(m):
            return _max_pool_2x2(h)
        return F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    if op.kind == "avgpool":
        assert isinstance(m, nn.AvgPool2d)
        return F.avg_pool2d(h, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)
    assert isinstance(m, nn.Flatten)
    return h.flatten(m.start_dim, m.end_dim)


def _is_plain_2x2(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.MaxPool2d)
        and m.kernel_size in (2, (2, 2))
        and m.stride in (2, (2, 2))
        and (m.padding in (0, (0, 0)) and m.dilation in (1, (1, 1)) and not m.ceil_mode)
    )


@dataclass
class IncrementalState:
    """Per-request state of the incremental engine: the input and every layer's cumulative output."""

    x: torch.Tensor  # (B, ...) the request's full-precision input
    acts: list[torch.Tensor]  # acts[0] = truncated input, acts[i + 1] = output of op i
    index: int  # the resolution these activations belong to

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, *self.acts))

    def release(self) -> None:
        self.acts.clear()


@dataclass
class Step:
    """One completed resolution of a stream: probabilities for every row, `computed` marks fresh rows."""

    index: int
    planes: int | None
    probs: torch.Tensor  # (B, C)
    computed: torch.Tensor  # (B,) bool: rows computed at this resolution (others kept an earlier answer)
    extras: dict[str, float] = field(default_factory=dict)


class RefinementEngine:
    """Serves one model at every resolution of a plan. Weights are truncated once, shared by requests.

    With an integer plan (`plan.grid`), each coarse resolution the model and planes allow runs on int8
    kernels (models/int8.py) with the engine `int8_engine` names, or the one `choose_engine` measures
    fastest on `sample` when it is "auto"; None keeps every resolution in float32. `kernels` says
    which ran each resolution; `engine_choice` how the engine was chosen.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: RefinementPlan,
        int8_engine: str | None = "auto",
        sample: torch.Tensor | None = None,
    ) -> None:
        self.plan = plan
        self.ops = _compile(model)
        layers = [op.module for op in self.ops if op.kind in ("conv", "linear")]
        float_params = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in layers]  # type: ignore[operator]
        self.params: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for planes in plan.planes:
            self.params.append([self._truncate_pair(w, b, planes) for w, b in float_params])
        self.params.append(float_params)
        self._fast = self._fast_ops()
        self.integer: dict[int, IntResolution] = {}
        self.engine_choice: dict[str, Any] = {}
        self._int8_source: tuple[nn.Module, tuple[int, ...], list[int]] | None = None  # model, grid, resolutions
        self._candidates: dict[str, IntResolution] | None = None
        if plan.grid is not None and int8_engine is not None:
            self._use_integers(model, plan.grid, int8_engine, sample)
        self.kernels = [
            f"int8/{self.integer[i].engine}" if i in self.integer else "float32" for i in range(plan.resolutions)
        ]

    def _use_integers(self, model: nn.Module, grid: tuple[int, ...], engine: str, sample: torch.Tensor | None) -> None:
        usable = [i for i, planes in enumerate(self.plan.planes) if int8.unsupported(model, planes) is None]
        if not usable:
            why = int8.unsupported(model, self.plan.planes[0])
            self.engine_choice = {"engine": None, "reason": why}
            logger.info("coarse resolutions stay in float32: %s", why)
            return
        if engine == "auto":
            if sample is None:
                raise RefinementError("choosing the int8 engine by measurement needs a sample batch")
            chosen, measured = int8.choose_engine(model, self.plan.planes[usable[0]], grid, sample)
            self.engine_choice = {"engine": chosen, "measured_ms": measured, "batch": len(sample)}
            if chosen is None:
                logger.warning(
                    "no int8 engine reproduces the integer reference here (%s): float32 throughout", measured
                )
                return
            logger.info("int8 engine %s chosen by measurement, median ms per pass: %s", chosen, measured)
            engine = chosen
        else:
            self.engine_choice = {"engine": engine, "measured_ms": None}
        self._int8_source = (model, grid, usable)
        for i in usable:
            self.integer[i] = int8.IntResolution(model, self.plan.planes[i], grid, engine)

    def int8_candidates(self, check: torch.Tensor) -> dict[str, IntResolution]:
        """The first integer resolution on every engine that reproduces the reference on `check`
        (built once; {} without integer resolutions). The worker re-times them when idle: the engine
        chosen at start-up was timed while other workers started on the same cores."""
        if self._candidates is None:
            if self._int8_source is None or not self.integer:
                self._candidates = {}
            else:
                model, grid, usable = self._int8_source
                self._candidates, _ = int8.candidates(model, self.plan.planes[usable[0]], grid, check)
        return self._candidates

    @property
    def int8_engine(self) -> str | None:
        """The engine the integer resolutions run on now (None: none runs on int8)."""
        return next(iter(self.integer.values())).engine if self.integer else None

    def use_engine(self, engine: str) -> None:
        """Serve every integer resolution on `engine` from now on (packs the weights again; call it in
        the thread that runs the passes)."""
        if self._int8_source is None or engine == self.int8_engine:
            return
        model, grid, usable = self._int8_source
        for i in usable:
            self.integer[i] = int8.IntResolution(model, self.plan.planes[i], grid, engine)
        self.kernels = [f"int8/{engine}" if i in self.integer else "float32" for i in range(self.plan.resolutions)]
        self.engine_choice = {**self.engine_choice, "engine": engine, "rechecked": True}
        logger.info("int8 engine now %s (re-timed when idle)", engine)

    def _truncate_pair(self, w: torch.Tensor, b: torch.Tensor, planes: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            truncate(w, planes, top_exponent(w, per_channel=self.plan.per_channel)),
            truncate(b, planes, top_exponent(b)),
        )

    def truncate_input(self, x: torch.Tensor, index: int) -> torch.Tensor:
        planes = self.plan.planes_at(index)
        return x if planes is None else truncate(x, planes, row_exponent(x))

    # -- direct passes ---------------------------------------------------------------------

    def _fast_ops(self) -> list[_Op]:
        """ReLU → MaxPool becomes MaxPool → ReLU: equal (both monotone), 4× less ReLU work."""
        ops = list(self.ops)
        for i in range(len(ops) - 1):
            if ops[i].kind == "relu" and ops[i + 1].kind == "pool":
                ops[i], ops[i + 1] = ops[i + 1], ops[i]
        return ops

    @torch.no_grad()
    def forward(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Logits (B, C) of resolution `index`, one direct pass (the fast path)."""
        integer = self.integer.get(index)
        if integer is not None:
            return integer.forward(x)
        return self.float_forward(x, index)

    @torch.no_grad()
    def float_forward(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Resolution `index` by float32 truncation (every resolution of a plan without a grid)."""
        params = self.params[index]
        h = self.truncate_input(x, index)
        for op in self._fast:
            if op.kind == "relu":
                h = h.relu_()  # in place: h is always a fresh intermediate here
            else:
                w, b = params[op.param_index] if op.param_index >= 0 else (None, None)
                h = _apply(op, h, w, b)
        return h

    @torch.no_grad()
    def reference(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """What resolution `index` must equal: the integer reference (numpy) for an int8 resolution,
        else the truncated model as an ordinary NCHW forward pass in the model's own layer order."""
        integer = self.integer.get(index)
        if integer is not None:
            return torch.from_numpy(integer.reference_logits(x.numpy()))
        params = self.params[index]
        h = self.truncate_input(x, index)
        for op in self.ops:
            w, b = params[op.param_index] if op.param_index >= 0 else (None, None)
            h = _apply(op, h, w, b)
        return h

    def stream(
        self, x: torch.Tensor, start: int = 0, stop_margin: torch.Tensor | float | None = None
    ) -> Iterator[Step]:
        """Yield each resolution from `start` to the float32 one, direct strategy.

        With `stop_margin` (a scalar or one per row), a row stops upgrading once its top-1 minus
        top-2 probability exceeds it; later resolutions are computed on the remaining rows only,
        so the saved work is real. Closing the generator stops the computation.
        """
        batch = len(x)
        margins = torch.full((batch,), float("inf")) if stop_margin is None else torch.as_tensor(stop_margin)
        margins = margins.expand(batch) if margins.dim() == 0 else margins
        active = torch.ones(batch, dtype=torch.bool)
        probs = torch.zeros(0)
        for index in range(start, self.plan.resolutions):
            rows = active.nonzero().flatten()
            fresh = torch.softmax(self.forward(x[rows], index), dim=1)
            probs = fresh if probs.numel() == 0 else probs.index_copy(0, rows, fresh)
            yield Step(index, self.plan.planes_at(index), probs, active.clone())
            top2 = fresh.topk(2, dim=1).values if fresh.shape[1] > 1 else torch.cat([fresh, fresh * 0], 1)
            done = (top2[:, 0] - top2[:, 1]) > margins[rows]
            active[rows[done]] = False
            if not active.any():
                return

    # -- incremental passes ----------------------------------------------------------------

    @torch.no_grad()
    def begin(self, x: torch.Tensor) -> tuple[IncrementalState, torch.Tensor]:
        """Resolution 0 by a direct pass that keeps every activation; returns (state, logits)."""
        params = self.params[0]
        acts = [self.truncate_input(x, 0)]
        for op in self.ops:
            w, b = params[op.param_index] if op.param_index >= 0 else (None, None)
            acts.append(_apply(op, acts[-1], w, b))
        return IncrementalState(x, acts, 0), acts[-1]

    @torch.no_grad()
    def upgrade(self, state: IncrementalState) -> torch.Tensor:
        """Move the state one resolution up with ΔZ = A_old·ΔH + ΔA·(H_old + ΔH); returns the new logits."""
        if not state.acts:
            raise RefinementError("this request's refinement state was released")
        new = state.index + 1
        if new >= self.plan.resolutions:
            raise RefinementError("the request is already at the final float32 resolution")
        old_params, new_params = self.params[state.index], self.params[new]
        delta = self.truncate_input(state.x, new) - state.acts[0]  # ΔH of the input: new planes of x
        for i, op in enumerate(self.ops):
            h_new = state.acts[i] + delta  # H_old + ΔH
            if op.kind in ("conv", "linear"):
                (w_old, _), (w_new, b_new) = old_params[op.param_index], new_params[op.param_index]
                b_old = old_params[op.param_index][1]
                out_delta = _apply(op, delta, w_old, None) + _apply(op, h_new, w_new - w_old, b_new - b_old)
            elif op.kind in ("flatten", "avgpool"):  # linear: the increment of the output is the op of ΔH
                out_delta = _apply(op, delta)
            else:  # relu, pool: increments from the stored old outputs
                out_delta = _apply(op, h_new) - state.acts[i + 1]
            state.acts[i] = h_new
            delta = out_delta
        state.acts[-1] = state.acts[-1] + delta
        state.index = new
        return state.acts[-1]


def activation_nbytes(engine: RefinementEngine, x: torch.Tensor) -> int:
    """Bytes of every tensor a plain forward pass produces (input included): the state budget's unit."""
    total = x.numel() * x.element_size()
    with torch.no_grad():
        h = x
        for op in engine.ops:
            w, b = engine.params[-1][op.param_index] if op.param_index >= 0 else (None, None)
            h = _apply(op, h, w, b)
            total += h.numel() * h.element_size()
    return total
