"""Offline evaluation: accuracies, disagreement matrices and Markdown tables for docs/."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of (N, C) scores against (N,) labels."""
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def disagreement_matrix(predictions: Sequence[np.ndarray]) -> list[list[float]]:
    """k×k fraction of inputs on which members i and j give different argmax classes."""
    k = len(predictions)
    return [[round(float(np.mean(predictions[i] != predictions[j])), 4) for j in range(k)] for i in range(k)]


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows of dicts → a GitHub Markdown table; floats shown with 4 decimals."""

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
