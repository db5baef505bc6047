"""Offline evaluation of coded inference: every method, k, r and straggler set, on validation and test.

Choices (the default method) are made on the validation rows only (DESIGN §5, models/selection.py);
the test rows are the reported figures.

Rows have exactly the keys of ROW_KEYS (issue 3). For r = 1 the straggler is one member index; for
r = 2 it is a pair "i+j", both decoded from the two coded outputs, and the figures are the means
over the pair. "none" is the no-decoding baseline: the COIN coded output served as if it were the
missing member's (r = 1 only).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.bundle import Bundle
from models.coded import METHODS, CodedSet, Ingredients, build_coded, members_of
from models.coding import decode, encode
from models.data import Split
from models.evaluate import markdown_table
from models.networks import predict_proba

ROW_KEYS = (
    "method",
    "k",
    "r",
    "straggler",
    "member_accuracy",
    "decoded_accuracy",
    "agreement",
    "agreement_on_disagreement",
    "build_seconds",
)


def _row(
    method: str, k: int, r: int, straggler: str, stats: list[tuple[float, float, float, float]], secs: float
) -> dict[str, Any]:
    mean = np.mean(np.array(stats), axis=0)
    return dict(
        zip(ROW_KEYS, (method, k, r, straggler, *(round(float(v), 4) for v in mean), round(secs, 3)), strict=True)
    )


def _objective(method: str, coded: CodedSet, coded_probs: dict[int, np.ndarray], probs: np.ndarray) -> dict[str, Any]:
    """Mean KL(Σ a_i p_i ‖ p_c) over the test set: how close each coded model is to its target mixture."""
    target = encode(probs, coded.coeffs)  # (r, N, C)
    kl = [
        float(np.mean(np.sum(target[c] * (np.log(target[c] + 1e-12) - np.log(coded_probs[c] + 1e-12)), axis=1)))
        for c in range(len(target))
    ]
    r, k = coded.coeffs.shape
    return {"method": method, "k": k, "r": r, "kl_to_mixture": round(float(np.mean(kl)), 5), **coded.details}


def _decoded_rows(
    coded: CodedSet,
    probs: np.ndarray,
    labels: np.ndarray,
    disagree: np.ndarray,
    coded_probs: dict[int, np.ndarray],
    method: str,
) -> list[dict[str, Any]]:
    """probs: (k, N, C) real member outputs; decode each straggler set from the coded outputs."""
    r, k = coded.coeffs.shape
    rows = []
    for missing in itertools.combinations(range(k), r):
        present = {i: probs[i] for i in range(k) if i not in missing}
        if method == "none":
            recovered = {j: coded_probs[0] for j in missing}
        else:
            recovered = decode(coded.coeffs, present, coded_probs)
        stats = []
        for j in missing:
            real, guess = probs[j].argmax(1), recovered[j].argmax(1)
            stats.append(
                (
                    float(np.mean(real == labels)),
                    float(np.mean(guess == labels)),
                    float(np.mean(guess == real)),
                    float(np.mean(guess[disagree] == real[disagree])) if disagree.any() else float("nan"),
                )
            )
        rows.append(_row(method, k, r, "+".join(map(str, missing)), stats, coded.build_seconds))
    return rows


@dataclass(frozen=True)
class Probe:
    """One split's images, labels and member outputs, on which every coded model is measured."""

    name: str  # "validation" (choices) or "test" (reported figures)
    images: torch.Tensor
    labels: np.ndarray
    probs: np.ndarray  # (K, N, C)


def _probe(name: str, split: Split, members: Sequence[torch.nn.Module]) -> Probe:
    images = torch.from_numpy(split.images)
    return Probe(name, images, split.labels, np.stack([predict_proba(m, images).numpy() for m in members]))


def _probes(ingredients: Ingredients, splits: Sequence[str], test_limit: int | None) -> list[Probe]:
    probes = []
    for name in splits:
        if name == "validation":  # validation images the calibration set did not use
            split = ingredients.selection()
        elif name == "test":
            split = ingredients.data().test_split(test_limit)
        else:
            raise ValueError(f"unknown split {name!r}; expected 'validation' or 'test'")
        probes.append(_probe(name, split, ingredients.members))
    return probes


def evaluate_coding(
    bundle: Bundle,
    ks: Sequence[int] = (2, 3, 4),
    rs: Sequence[int] = (1, 2),
    methods: Sequence[str] = (*METHODS, "none"),
    parity_epochs: int = 6,
    calibrate: bool = True,
    test_limit: int | None = None,
    splits: Sequence[str] = ("validation", "test"),
    ingredients: Ingredients | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows (ROW_KEYS plus `split`) for every split, and objective rows (KL to the mixture, per split).

    Every coded model is built once and measured on each split in `splits`; the test split is read
    only when "test" is asked for, so `splits=("validation",)` is what choices run on.
    """
    members = members_of(bundle)
    if max(ks) > len(members):
        raise ValueError(f"the bundle has {len(members)} members; cannot evaluate k={max(ks)}")
    ingredients = ingredients or Ingredients(bundle, members, parity_epochs=parity_epochs, calibrate=calibrate)
    probes = _probes(ingredients, splits, test_limit)
    rows: list[dict[str, Any]] = []
    objective: list[dict[str, Any]] = []
    for k, r in itertools.product(ks, rs):
        if r > k:
            continue
        built: dict[str, CodedSet] = {}
        for method in methods:
            if method == "none" and r != 1:
                continue
            source = "coin" if method == "none" else method
            if source not in built:
                built[source] = build_coded(ingredients, source, k, r)
            coded = built[source]
            for probe in probes:
                probs = probe.probs[:k]
                coded_probs = {c: predict_proba(m, probe.images).numpy() for c, m in enumerate(coded.models)}
                disagree = np.any(probs.argmax(2) != probs[0].argmax(1), axis=0)  # (N,) some pair of members differs
                split_rows = _decoded_rows(coded, probs, probe.labels, disagree, coded_probs, method)
                rows += [{**row, "split": probe.name} for row in split_rows]
                if method != "none":
                    objective.append({**_objective(method, coded, coded_probs, probs), "split": probe.name})
            log(f"k={k} r={r} {method:16s} built in {coded.build_seconds:.1f} s")
    return rows, objective


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over straggler sets per (method, k, r): the table a reader compares first."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["k"], row["r"]), []).append(row)
    out = []
    for (method, k, r), group in groups.items():
        out.append(
            {
                "method": method,
                "k": k,
                "r": r,
                "straggler": "mean",
                **{key: round(float(np.mean([g[key] for g in group])), 4) for key in ROW_KEYS[4:]},
            }
        )
    return sorted(out, key=lambda row: (row["r"], row["k"], row["method"]))


def report(
    rows: Sequence[dict[str, Any]], objective: Sequence[dict[str, Any]], scores: Sequence[dict[str, Any]]
) -> str:
    """Markdown: the validation scores the default was chosen by, then the test tables."""
    test = [row for row in rows if row.get("split", "test") == "test"]
    test_objective = [row for row in objective if row.get("split", "test") == "test"]
    score_keys = ("method", "mean_agreement_on_disagreement", "beats_average", "worst_build_vs_parity")
    return (
        "### Validation: the default method is chosen here (mean over k, r of agreement on disagreement)\n\n"
        + markdown_table(scores, score_keys)
        + "\n\n### Mean over stragglers (test split)\n\n"
        + markdown_table(summary(test), ROW_KEYS)
        + "\n\n### Distance of each coded model to its target mixture (test split, mean KL)\n\n"
        + markdown_table(test_objective, ("method", "k", "r", "kl_to_mixture", "temperatures"))
        + "\n\n### Every straggler (test split)\n\n"
        + markdown_table(test, ROW_KEYS)
        + "\n"
    )
