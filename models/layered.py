"""Layered, coded matrix-vector products: the seed paper's linear case, exact at every layer.

A and x hold integers of m·b bits in sign-magnitude. Split by significance into m digits of b bits:
A = Σ_i 2^((m-1-i)b) A_i and x = Σ_j 2^((m-1-j)b) x_j, so A·x = Σ_{i,j} 2^((2m-2-i-j)b) A_i x_j.
Layer ℓ (ℓ = 0 … 2m-2, L = 2m − 1 layers) holds the products with i + j = ℓ: [1, 2, …, m, …, 2, 1]
of them, each 1/m² of the work, and the running sum after layer ℓ is A·x at resolution ℓ.

Redundancy: the rows of A are cut into K blocks and N ≥ K workers each hold one coded block
Σ_k G[n, k]·A^(k) with an integer Vandermonde generator (nodes 1..N), so every K×K submatrix is
invertible and any K workers' results finish a layer. Decoding uses the integer adjugate, so it is
exact: no floating point anywhere.
"""

from __future__ import annotations

import itertools

import numpy as np


def digits(v: np.ndarray, m: int, b: int) -> list[np.ndarray]:
    """Signed digits, most significant first: v = Σ_i 2^((m-1-i)b) · digits[i], |digit| < 2^b."""
    v = np.asarray(v, dtype=np.int64)
    if np.abs(v).max(initial=0) >= 1 << (m * b):
        raise ValueError(f"values must fit in {m * b} magnitude bits")
    sign, mag = np.sign(v), np.abs(v)
    return [sign * ((mag >> ((m - 1 - i) * b)) & ((1 << b) - 1)) for i in range(m)]


def layer_terms(m: int) -> list[list[tuple[int, int]]]:
    """[(i, j) products] per layer: layer ℓ holds i + j = ℓ."""
    return [[(i, ell - i) for i in range(m) if 0 <= ell - i < m] for ell in range(2 * m - 1)]


def generator(n: int, k: int) -> np.ndarray:
    """(N, K) integer Vandermonde matrix with nodes 1..N: every K rows are linearly independent."""
    return np.vander(np.arange(1, n + 1), k, increasing=True).astype(np.int64)


def encode_rows(a: np.ndarray, g: np.ndarray) -> list[np.ndarray]:
    """Coded row blocks, one per worker: Σ_k G[n, k] A^(k) (A's rows split into K equal blocks)."""
    k = g.shape[1]
    if a.shape[0] % k:
        raise ValueError(f"{a.shape[0]} rows do not split into {k} equal blocks")
    blocks = np.stack(np.split(np.asarray(a, dtype=np.int64), k))  # (K, rows/K, cols)
    return [np.tensordot(row, blocks, axes=1) for row in g]


def worker_layer(coded_digits: list[np.ndarray], x_digits: list[np.ndarray], ell: int, m: int, b: int) -> np.ndarray:
    """What worker n computes for layer ℓ: Σ_{i+j=ℓ} 2^((2m-2-ℓ)b) C_{n,i} x_j (integers)."""
    scale = 1 << ((2 * m - 2 - ell) * b)
    return scale * sum(coded_digits[i] @ x_digits[j] for i, j in layer_terms(m)[ell])


def _adjugate(g: np.ndarray) -> tuple[np.ndarray, int]:
    """(adj(G), det(G)) with exact Python integers (K is small)."""
    k = len(g)
    rows = [[int(v) for v in row] for row in g]

    def det(mat: list[list[int]]) -> int:
        if len(mat) == 1:
            return mat[0][0]
        return sum((-1) ** c * mat[0][c] * det([r[:c] + r[c + 1 :] for r in mat[1:]]) for c in range(len(mat)))

    d = det(rows)
    adj = [
        [(-1) ** (i + j) * det([r[:j] + r[j + 1 :] for n, r in enumerate(rows) if n != i]) for i in range(k)]
        for j in range(k)
    ]
    if k == 1:
        adj = [[1]]
    return np.array(adj, dtype=object), d


def decode_layer(g: np.ndarray, results: dict[int, np.ndarray]) -> np.ndarray:
    """Recover the layer's uncoded output A·x (rows in order) from any K workers' results, exactly."""
    k = g.shape[1]
    if len(results) < k:
        raise ValueError(f"need {k} worker results, got {len(results)}")
    chosen = sorted(results)[:k]
    adj, det = _adjugate(g[chosen])
    stacked = np.stack([results[n].astype(object) for n in chosen])  # (K, rows/K)
    numer = np.tensordot(adj, stacked, axes=1)  # exact integers
    blocks = numer // det
    if np.any(blocks * det != numer):
        raise ArithmeticError("decoding was not exact: inconsistent worker results")
    return np.concatenate(list(blocks)).astype(np.int64)


def any_k_subsets(n: int, k: int) -> list[tuple[int, ...]]:
    return list(itertools.combinations(range(n), k))
