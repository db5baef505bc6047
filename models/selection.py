"""Every choice coinserve makes from data, made on the validation split only (DESIGN §5).

- the default coding method: the best mean agreement on disagreement over the validation rows of
  `coinserve eval-coding`, among methods that build in ≤ 10% of the parity model's time
  (`choose_coding_method`);
- the members' fine-tuning recipe: shard skew, learning rate and steps against the member targets
  (`recipe_rows`, `choose_recipe`);
- the served refinement plan: the fewest planes within 5 points of float32, and the int8 activation
  grid (`choose_plan`, `choose_grid`).

None of these reads the test split; tests/models/test_selection.py runs them with `load_split("test")`
raising.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models import int8
from models.bitplanes import RefinementPlan, row_exponent
from models.bundle import Bundle
from models.coded import Ingredients
from models.coding_eval import evaluate_coding, summary
from models.data import Split, dirichlet_shards
from models.evaluate import accuracy
from models.fitting import TrainingConfig, finetune_member
from models.networks import predict_proba
from models.refine import RefinementEngine
from models.refine_eval import ladder_accuracy

BASELINES = ("none",)  # a row kind, not a coded model one could serve
BUILD_BUDGET = 0.10  # a coded model may cost at most 10% of training the parity model (issue 18)
PLAN_TOLERANCE = 0.05  # the first resolution may lose at most 5 points against float32
MEMBER_ACCURACY_FLOOR = 0.85  # every member this accurate on validation ...
DISAGREEMENT_FLOOR = 0.05  # ... and every pair disagreeing on at least this fraction


def coding_scores(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method, over validation rows only: mean agreement on disagreement over every (k, r), how
    many (k, r) it beats plain averaging at, and its worst build time as a fraction of parity's."""
    validation = [row for row in rows if row.get("split") == "validation"]
    means = {(row["method"], row["k"], row["r"]): row for row in summary(validation)}
    average = {(k, r): row["agreement_on_disagreement"] for (m, k, r), row in means.items() if m == "average"}
    parity = {(k, r): row["build_seconds"] for (m, k, r), row in means.items() if m == "parity"}
    scores = []
    for method in sorted({m for m, _, _ in means} - set(BASELINES)):
        cells = {(k, r): row for (m, k, r), row in means.items() if m == method}
        values = [row["agreement_on_disagreement"] for row in cells.values()]
        beats = sum(cell["agreement_on_disagreement"] > average.get(key, np.inf) for key, cell in cells.items())
        ratios = [cell["build_seconds"] / parity[key] for key, cell in cells.items() if parity.get(key)]
        scores.append(
            {
                "method": method,
                "mean_agreement_on_disagreement": round(float(np.mean(values)), 4),
                "beats_average": f"{beats}/{len(cells)}",
                "worst_build_vs_parity": round(max(ratios), 4) if ratios else None,
            }
        )
    return sorted(scores, key=lambda s: -s["mean_agreement_on_disagreement"])


def choose_coding_method(rows: Sequence[dict[str, Any]]) -> str:
    """The default method: best mean validation agreement on disagreement among the methods whose
    build costs at most BUILD_BUDGET of the parity model's at every (k, r) (when parity was measured).
    When none does (a small imported bundle: its parity model trains on a few hundred calibration
    inputs in a fraction of a second, cheaper than any merge's statistics), the budget cannot
    separate methods and the best merge is chosen. Test rows are ignored."""
    every = coding_scores(rows)
    scores = [s for s in every if s["method"] != "parity"] or every  # parity is the trained baseline
    if not scores:
        raise ValueError("no validation rows to choose a coding method from")
    affordable = [s for s in scores if s["worst_build_vs_parity"] is None or s["worst_build_vs_parity"] <= BUILD_BUDGET]
    return str((affordable or scores)[0]["method"])


def select_coding_method(
    bundle: Bundle, ingredients: Ingredients, methods: Sequence[str], **kwargs: Any
) -> tuple[str, list[dict[str, Any]]]:
    """Build and measure every method on validation only, then choose; returns (method, rows)."""
    rows, _ = evaluate_coding(bundle, methods=methods, splits=("validation",), ingredients=ingredients, **kwargs)
    return choose_coding_method(rows), rows


# The grid docs/training.md searched (shard α, member lr, steps); k, seed and batch as the default recipe.
RECIPE_CANDIDATES = tuple(
    TrainingConfig(alpha=alpha, member_lr=lr, member_steps=steps)
    for alpha, lr, steps in ((0.5, 2e-4, 300), (1.0, 3e-4, 300), (2.0, 2e-4, 300), (0.5, 1e-4, 100))
)


def recipe_rows(
    base: nn.Module,
    train: Split,
    validation: Split,
    candidates: Sequence[TrainingConfig],
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Fine-tune k members from `base` per candidate recipe and measure them on validation."""
    images = torch.from_numpy(validation.images)
    rows = []
    for cfg in candidates:
        shards = dirichlet_shards(train.labels, cfg.k, cfg.alpha, seed=cfg.seed)
        members = [finetune_member(base, train.subset(index), cfg, i) for i, index in enumerate(shards)]
        preds = [predict_proba(m, images).numpy() for m in members]
        accuracies = [accuracy(p, validation.labels) for p in preds]
        labels = [p.argmax(1) for p in preds]
        pairs = [float(np.mean(a != b)) for i, a in enumerate(labels) for b in labels[i + 1 :]]
        rows.append(
            {
                "alpha": cfg.alpha,
                "member_lr": cfg.member_lr,
                "member_steps": cfg.member_steps,
                "min_member_accuracy": round(min(accuracies), 4),
                "max_member_accuracy": round(max(accuracies), 4),
                "min_disagreement": round(min(pairs), 4),
                "max_disagreement": round(max(pairs), 4),
            }
        )
        log(f"recipe alpha={cfg.alpha} lr={cfg.member_lr} steps={cfg.member_steps}: {rows[-1]}")
    return rows


def recipe_margin(row: dict[str, Any]) -> float:
    """How far the recipe clears both targets (negative: it misses one)."""
    return min(row["min_member_accuracy"] - MEMBER_ACCURACY_FLOOR, row["min_disagreement"] - DISAGREEMENT_FLOOR)


def choose_recipe(rows: Sequence[dict[str, Any]], default: TrainingConfig) -> TrainingConfig:
    """The candidate clearing both member targets on validation by the widest margin."""
    best = max(rows, key=recipe_margin)
    return replace(default, alpha=best["alpha"], member_lr=best["member_lr"], member_steps=best["member_steps"])


def choose_plan(
    model: nn.Module, validation: Split, tolerance: float = PLAN_TOLERANCE
) -> tuple[RefinementPlan, list[dict[str, Any]]]:
    """The served plan, chosen on validation; returns (plan, the ladder rows).

    When the model has an integer program (models/int8.py): the fewest planes (1..6) whose int8
    resolution, with its activation grid chosen on validation (`choose_grid`), is within `tolerance`
    of float32 (plane counts are tried in increasing order: the search stops at that one). Otherwise,
    or when none is: the fewest planes within `tolerance` by float32 truncation, with the exponent
    layout (per channel or per tensor) that is more accurate there; those two ladder rows are
    measured only then, as they cannot change an integer choice.
    """
    images = torch.from_numpy(validation.images)
    integer = int8.unsupported(model, 1) is None and bool(int8.available_engines())
    trials = (1 + (len(GRID_SPAN) - 1) * int8.hidden_layers(model)) * (int8.MAX_PLANES - 1) if integer else 0
    # the bar counts passes over the validation images: per plane count 1 + 10 per hidden layer (an
    # upper bound: the search stops at the first close plane count), then the truncation ladder if needed
    ladder: list[dict[str, Any]] = []
    with progress(total=1 + trials if integer else 0, desc="plan", unit="pass") as bar:
        if integer:
            full = float32_accuracy(model, images, validation.labels)
            bar.update()
            rows = integer_ladder(model, images, validation.labels, enough=full - tolerance, tick=bar.update)
            ladder.append({"exponents": "per-channel, int8", **{str(r["planes"]): r["accuracy"] for r in rows},
                           "grids": {str(r["planes"]): r["grid"] for r in rows}, "float32": full})  # fmt: skip
            close = [r for r in rows if r["accuracy"] >= full - tolerance]
            if close:  # the float32-truncation rows would not change the choice: not measured
                chosen = min(close, key=lambda r: r["planes"])
                return RefinementPlan(planes=(chosen["planes"],), per_channel=True, grid=tuple(chosen["grid"])), ladder
        bar.total = bar.n + 2 * (LADDER_PLANES + 1)
        bar.refresh()
        ladder[:0] = ladder_accuracy(model, images, validation.labels, max_planes=LADDER_PLANES, tick=bar.update)
    best: tuple[int, float, bool] | None = None
    for row in ladder[:2]:
        per_channel = row["exponents"] == "per-channel"
        close_planes = [int(p) for p in row if p.isdigit() and row[p] >= row["float32"] - tolerance]
        if not close_planes:
            continue
        candidate = (min(close_planes), -row[str(min(close_planes))], not per_channel)
        best = candidate if best is None or candidate < best else best
    if best is None:  # nothing close enough: serve the most precise truncation before float32
        return RefinementPlan(planes=(max(int(p) for p in ladder[0] if p.isdigit()),)), ladder
    first, _, per_tensor = best
    return RefinementPlan(planes=(first,), per_channel=not per_tensor), ladder


LADDER_PLANES = 8  # the float32-truncation ladder's plane counts, 1..8


def progress(total: int, desc: str, unit: str = "it") -> tqdm:
    """A progress bar on stderr, quiet when stderr is not a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)


def float32_accuracy(model: nn.Module, images: torch.Tensor, labels: np.ndarray) -> float:
    """Validation accuracy of the float32 model, as `ladder_accuracy` reports it (the same passes)."""
    engine = RefinementEngine(model, RefinementPlan((1,)))
    full = engine.plan.resolutions - 1
    preds = torch.cat([engine.forward(images[i : i + 1000], full).argmax(1) for i in range(0, len(images), 1000)])
    return round(float(np.mean(preds.numpy() == labels)), 4)


GRID_START = -4  # the paper's activation grid on MNIST, 2⁻⁴: where the greedy search starts
GRID_SPAN = range(-8, 3)  # exponents tried for each hidden layer


class _Trials:
    """Validation accuracy of int8 resolutions at one plane count, sharing work between the grid
    search's trials: the input is quantised once, and a trial that changes layer l's exponent reuses
    the activations entering layer l (they depend on the exponents before it only) and runs layers
    l.. alone. Bit-identical to a fresh `IntResolution.forward` per trial (exact integer arithmetic),
    so the search chooses what evaluating every trial from scratch chooses (tests/models/test_selection.py).
    """

    def __init__(
        self, model: nn.Module, planes: int, images: torch.Tensor, labels: np.ndarray, tick: Callable[[], object]
    ) -> None:
        self.model, self.planes, self.tick = model, planes, tick
        self.engine = int8.available_engines()[0]
        self.labels = [torch.from_numpy(labels[i : i + 1000]) for i in range(0, len(images), 1000)]
        self.total = len(images)
        start = int8.IntResolution(model, planes, [GRID_START] * int8.hidden_layers(model), self.engine)
        self.inputs: list[list[tuple[torch.Tensor, torch.Tensor, int]]] = []  # per chunk: (rows, h, p0) groups
        for i in range(0, len(images), 1000):
            x = images[i : i + 1000]
            p0 = row_exponent(x).flatten().to(torch.int64)  # IntResolution.forward's grouping
            groups = []
            for value in p0.unique().tolist():
                rows = (p0 == value).nonzero().flatten()
                groups.append((rows, start.quantize_input(x[rows].contiguous(), int(value)), int(value)))
            self.inputs.append(groups)
        self.layer = 0  # self.inputs hold the activations entering this layer

    def resolution(self, grid: Sequence[int]) -> int8.IntResolution:
        return int8.IntResolution(self.model, self.planes, grid, self.engine)

    def advance(self, grid: Sequence[int]) -> None:
        """Run the held activations through layer `self.layer` under `grid` (its exponents up to it final)."""
        res = self.resolution(grid)
        self.inputs = [
            [(rows, res.run(h, p0, self.layer, self.layer + 1), p0) for rows, h, p0 in c] for c in self.inputs
        ]
        self.layer += 1

    def accuracy(self, grid: Sequence[int]) -> float:
        """Accuracy of `grid`, which may differ from the held activations' grid at layer `self.layer` on."""
        res = self.resolution(grid)
        right = 0
        for groups, labels in zip(self.inputs, self.labels, strict=True):
            for rows, h, p0 in groups:
                right += int((res.run(h, p0, self.layer).argmax(1) == labels[rows]).sum())
        self.tick()
        return right / self.total


def _no_tick() -> None:
    return None


def choose_grid(
    model: nn.Module,
    planes: int,
    images: torch.Tensor,
    labels: np.ndarray,
    tick: Callable[[], object] = _no_tick,
) -> tuple[tuple[int, ...], float]:
    """The activation grid of an int8 resolution, on validation: layer by layer (input side first),
    the exponent in GRID_SPAN with the best accuracy given the layers before it, starting from 2⁻⁴
    everywhere; ties go to the finer grid. Returns (grid, its validation accuracy). `tick` is called
    after each of the 1 + 10 · hidden layers accuracies measured (progress)."""
    trials = _Trials(model, planes, images, labels, tick)
    grid = [GRID_START] * int8.hidden_layers(model)
    best = trials.accuracy(grid)
    for layer in range(len(grid)):
        if layer:
            trials.advance(grid)  # layers before `layer` are final now
        for g in GRID_SPAN:
            if g == grid[layer]:
                continue
            trial = [*grid[:layer], g, *grid[layer + 1 :]]
            acc = trials.accuracy(trial)
            if acc > best or (acc == best and g < grid[layer]):
                grid, best = trial, acc
    return tuple(grid), best


def integer_ladder(
    model: nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    planes: Sequence[int] = range(2, int8.MAX_PLANES + 1),
    enough: float | None = None,
    tick: Callable[[], object] = _no_tick,
) -> list[dict[str, Any]]:
    """Validation accuracy of the int8 resolution at each plane count, each with its chosen grid;
    with `enough`, stops after the first plane count whose (rounded) accuracy reaches it."""
    rows: list[dict[str, Any]] = []
    for p in planes:
        grid, acc = choose_grid(model, p, images, labels, tick)
        rows.append({"planes": p, "grid": list(grid), "accuracy": round(acc, 4)})
        if enough is not None and round(acc, 4) >= enough:
            break
    return rows
