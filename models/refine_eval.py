"""Offline evaluation of successive refinement on the test split: accuracy and time per resolution,
the adaptive stop, the per-request state, and the linear case's deadline success rates.

Timings are medians of repeated runs after warm-up, with the resolution passes and the one-shot
float32 pass interleaved so that machine noise hits both alike. The one-shot pass is the engine's
own optimised float32 forward (the plain `nn.Sequential` forward is reported beside it).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from models.bitplanes import RefinementPlan
from models.bundle import Bundle
from models.evaluate import markdown_table
from models.layered_sim import SimConfig, simulate
from models.machine import FLAGS, machine
from models.refine import RefinementEngine, activation_nbytes
from models.sources import source

ROW_KEYS = (
    "batch",
    "resolution",
    "planes",
    "accuracy",
    "agreement_with_full",
    "step_ms",
    "cumulative_ms",
    "one_shot_ms",
    "best_float32_ms",
    "vs_best_float32",
)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def _accuracies(
    engine: RefinementEngine, images: torch.Tensor, labels: np.ndarray, tick: Callable[[], object] | None = None
) -> tuple[list[float], list[float]]:
    preds = []
    for r in range(engine.plan.resolutions):
        preds.append(
            torch.cat([engine.forward(images[i : i + 1000], r).argmax(1) for i in range(0, len(images), 1000)]).numpy()
        )
        if tick is not None:
            tick()
    full = preds[-1]
    return [float(np.mean(p == labels)) for p in preds], [float(np.mean(p == full)) for p in preds]


def float32_passes(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Plain PyTorch float32 one-shot passes to compare with: as the model is, and channels_last."""
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x_last = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    def plain() -> object:
        with torch.no_grad():
            return model(x)

    def channels_last() -> object:
        with torch.no_grad():
            return last(x_last)

    return {"plain_pytorch": plain, "plain_pytorch_channels_last": channels_last}


def timing_rows(
    engine: RefinementEngine,
    images: torch.Tensor,
    accuracy: list[float],
    agreement: list[float],
    batch: int,
    repeats: int,
    model: torch.nn.Module | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Direct strategy rows, plus the incremental strategy's times for the docs. Every float32
    one-shot pass (the engine's; plain PyTorch as is and channels_last, given `model`) is timed in
    the same interleaved loop; `best_float32_ms` is the fastest of them, the one ratios are to."""
    x = images[:batch]
    steps = engine.plan.resolutions
    others = float32_passes(model, x) if model is not None else {}
    for _ in range(5):  # warm-up: allocator, kernels, caches
        for r in range(steps):
            engine.forward(x, r)
        for run in others.values():
            run()
    direct: list[list[float]] = [[] for _ in range(steps)]
    one_shot: list[float] = []
    other_ms: dict[str, list[float]] = {name: [] for name in others}
    for _ in range(repeats):
        for r in range(steps):
            direct[r].append(_median_ms(lambda r=r: engine.forward(x, r), 1))  # type: ignore[misc]
        one_shot.append(_median_ms(lambda: engine.forward(x, steps - 1), 1))
        for name, run in others.items():
            other_ms[name].append(_median_ms(run, 1))
    one = statistics.median(one_shot)
    passes = {"engine_float32": one, **{name: statistics.median(v) for name, v in other_ms.items()}}
    best_name = min(passes, key=passes.__getitem__)
    best = passes[best_name]
    rows, cumulative = [], 0.0
    for r in range(steps):
        step = statistics.median(direct[r])
        cumulative += step
        planes = engine.plan.planes_at(r)
        rows.append(
            dict(
                zip(
                    ROW_KEYS,
                    (
                        batch,
                        r,
                        planes,
                        round(accuracy[r], 4),
                        round(agreement[r], 4),
                        round(step, 3),
                        round(cumulative, 3),
                        round(one, 3),
                        round(best, 3),
                        round(cumulative / best, 3),
                    ),
                    strict=True,
                )
            )
        )
    extras: dict[str, Any] = {
        "incremental_" + str(r): ms for r, ms in enumerate(_incremental_ms(engine, x, max(3, repeats // 4)))
    }
    extras.update({f"{name}_one_shot": ms for name, ms in passes.items()})
    extras["best_float32"] = best_name
    return rows, extras


def _incremental_ms(engine: RefinementEngine, x: torch.Tensor, repeats: int) -> list[float]:
    """Median time of begin (resolution 0) and of each upgrade (1..R-1)."""
    per_step: list[list[float]] = [[] for _ in range(engine.plan.resolutions)]
    for _ in range(repeats + 1):
        start = time.perf_counter()
        state, _ = engine.begin(x)
        per_step[0].append(time.perf_counter() - start)
        for r in range(1, engine.plan.resolutions):
            start = time.perf_counter()
            engine.upgrade(state)
            per_step[r].append(time.perf_counter() - start)
        state.release()
    return [statistics.median(s[1:]) * 1000 for s in per_step]  # first round is warm-up


def adaptive_rows(
    engine: RefinementEngine, images: torch.Tensor, labels: np.ndarray, margins: Sequence[float], step_ms: list[float]
) -> list[dict[str, Any]]:
    """Per stop margin: fraction still upgrading after each resolution but the last, accuracy, compute saved.

    Compute saved weighs each resolution's rows by its measured batch-64 step time; wall time is
    measured too (batches of 64 through `stream`).
    """
    rows = []
    full_cost = sum(step_ms) * len(images)
    for margin in margins:
        computed = np.zeros(engine.plan.resolutions)
        final = []
        start = time.perf_counter()
        for i in range(0, len(images), 64):
            last = None
            for step in engine.stream(images[i : i + 64], stop_margin=margin):
                computed[step.index] += float(step.computed.sum())
                last = step
            assert last is not None
            final.append(last.probs.argmax(1).numpy())
        wall = time.perf_counter() - start
        cost = float(np.dot(computed, step_ms))
        rows.append(
            {
                "stop_margin": margin,
                "still_upgrading_after": [round(float(c) / len(images), 4) for c in computed[1:]],
                "accuracy": round(float(np.mean(np.concatenate(final) == labels)), 4),
                "compute_saved": round(1 - cost / full_cost, 4),
                "wall_s": round(wall, 3),
            }
        )
    return rows


def ladder_accuracy(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    max_planes: int = 8,
    tick: Callable[[], object] | None = None,
) -> list[dict[str, Any]]:
    """Accuracy at 1..max_planes planes, per-tensor against per-output-channel exponents (`tick`:
    called after each resolution's pass, for progress)."""
    out = []
    for per_channel in (False, True):
        engine = RefinementEngine(model, RefinementPlan(tuple(range(1, max_planes + 1)), per_channel=per_channel))
        accuracy, _ = _accuracies(engine, images, labels, tick)
        out.append(
            {
                "exponents": "per-channel" if per_channel else "per-tensor",
                **{str(p): round(a, 4) for p, a in zip(range(1, max_planes + 1), accuracy, strict=False)},
                "float32": round(accuracy[-1], 4),
            }
        )
    return out


def evaluate_refinement(
    bundle: Bundle,
    plans: dict[str, RefinementPlan],
    model_name: str = "member-0",
    batches: Sequence[int] = (1, 64),
    repeats: int = 40,
    margins: Sequence[float] = (0.3, 0.5, 0.7, 0.9),
    linear: SimConfig | None = None,
    deadlines: Sequence[float] = (1, 2, 3, 4, 6, 8, 12),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    model = bundle.build_model(model_name)
    test = source(bundle).test_split()
    images = torch.from_numpy(test.images)
    report: dict[str, Any] = {
        "machine": {
            **machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "quantized_engines": list(torch.backends.quantized.supported_engines),
        },
        "model": model_name,
        "plans": {},
    }
    for name, plan in plans.items():
        engine = RefinementEngine(model, plan, sample=images[: max(batches)])
        log(f"plan {name}: resolutions on {engine.kernels}; int8 engine {engine.engine_choice or 'none'}")
        accuracy, agreement = _accuracies(engine, images, test.labels)
        rows, extras = [], {}
        for batch in batches:
            batch_rows, batch_extras = timing_rows(engine, images, accuracy, agreement, batch, repeats, model)
            for row in batch_rows:
                row["kernel"] = engine.kernels[row["resolution"]]
            rows += batch_rows
            extras[str(batch)] = {k: round(v, 3) if isinstance(v, float) else v for k, v in batch_extras.items()}
            log(f"plan {name}: batch {batch} timed")
        state, _ = engine.begin(images[:1])
        step64 = [r["step_ms"] for r in rows if r["batch"] == max(batches)]
        report["plans"][name] = {
            "plan": plan.to_dict(),
            "kernels": engine.kernels,
            "int8_engine": engine.engine_choice or None,
            "rows": rows,
            "incremental_ms": extras,
            "state_bytes_per_request": state.nbytes(),
            "activation_bytes_per_request": activation_nbytes(engine, images[:1]),
            "adaptive": adaptive_rows(engine, images, test.labels, margins, step64),
            "first_within_5_points": first_within(rows, max(batches), 0.05),
        }
        state.release()
    report["ladder"] = ladder_accuracy(model, images, test.labels)
    if linear is not None:
        log("linear case: simulating with real worker processes")
        report["linear"] = [vars(r) for r in simulate(linear, list(deadlines))]
        report["linear_config"] = vars(linear)
    return report


def first_within(rows: list[dict[str, Any]], batch: int, points: float) -> dict[str, Any] | None:
    """The first resolution whose accuracy is within `points` of the full model's, at `batch`: its
    cumulative time and its ratio to the best float32 one-shot pass of the same run."""
    at = [r for r in rows if r["batch"] == batch]
    full = at[-1]["accuracy"]
    first = next((r for r in at if r["accuracy"] >= full - points), None)
    if first is None:
        return None
    keys = ("batch", "resolution", "planes", "accuracy", "cumulative_ms", "best_float32_ms", "vs_best_float32")
    return {k: first[k] for k in keys}


def markdown(report: dict[str, Any]) -> str:
    m = report.get("machine", {})
    flags = ", ".join(m.get("cpu_flags") or []) or "none of " + "/".join(FLAGS)
    parts = [
        f"Machine: {m.get('cpu', '?')}, flags {flags}, {m.get('threads', '?')} torch threads, torch "
        f"{m.get('torch', '?')}, quantized engines {m.get('quantized_engines', '?')}.\n"
    ]
    for name, section in report["plans"].items():
        parts.append(f"### Plan `{name}`: planes {section['plan']['planes']} then float32\n")
        choice = section.get("int8_engine") or {}
        if choice.get("engine"):
            parts.append(
                f"Kernels {section['kernels']}; int8 engine `{choice['engine']}`, chosen by measurement "
                f"(median ms per pass at batch {choice.get('batch')}: {choice.get('measured_ms')}).\n"
            )
        elif choice:
            parts.append(f"Every resolution in float32: {choice.get('reason') or choice.get('measured_ms')}.\n")
        parts.append(markdown_table(section["rows"], (*ROW_KEYS, "kernel")))
        first = section.get("first_within_5_points")
        if first is not None:
            parts.append(
                f"\nFirst resolution within 5 points of full (batch {first['batch']}): resolution "
                f"{first['resolution']} ({first['planes']} planes), {first['cumulative_ms']} ms = "
                f"**{first['vs_best_float32']}×** the best float32 one-shot pass ({first['best_float32_ms']} ms)."
            )
        timings = section["incremental_ms"].items()
        parts.append(
            "\nIncremental strategy (begin, then each upgrade), ms: "
            + ", ".join(f"batch {b}: {[v for k, v in t.items() if k.startswith('incremental_')]}" for b, t in timings)
        )
        parts.append(
            "\nFloat32 one-shot passes timed in the same loop, ms: "
            + "; ".join(
                f"batch {b}: "
                + ", ".join(f"{k.removesuffix('_one_shot')} {v}" for k, v in t.items() if k.endswith("_one_shot"))
                + f" (best: {t['best_float32']})"
                for b, t in timings
            )
        )
        ratio = section["state_bytes_per_request"] / section["activation_bytes_per_request"]
        state = section["state_bytes_per_request"]
        parts.append(f"\nPer-request incremental state: {state} bytes = {ratio:.2f}× one forward pass's activations.\n")
        parts.append("Adaptive stop (batches of 64, whole test split):\n")
        parts.append(
            markdown_table(
                section["adaptive"], ("stop_margin", "still_upgrading_after", "accuracy", "compute_saved", "wall_s")
            )
        )
        parts.append("")
    parts.append("### Accuracy by planes (test split)\n")
    ladder_cols = ("exponents", *[str(p) for p in range(1, 9)], "float32")
    parts.append(markdown_table(report["ladder"], ladder_cols))
    if "linear" in report:
        parts.append("\n### Linear case: success rate per layer against the deadline (slots)\n")
        rows = [
            {
                "deadline": r["deadline_slots"],
                "mode": "layered" if r["layered"] else "one-shot",
                "layer_success": r["layer_success"],
                "exact": f"{r['exact_layers']}/{r['checked_layers']}",
            }
            for r in report["linear"]
        ]
        parts.append(markdown_table(rows, ("deadline", "mode", "layer_success", "exact")))
    return "\n".join(parts) + "\n"
