"""Microbenchmark: the gateway's decoding cost per query (models.coding.decode), batch 1 and 64.

Run: python -m bench.decode_cost
"""

from __future__ import annotations

import timeit

import numpy as np

from models.coding import Code, coefficients, encode


def main() -> None:
    rng = np.random.default_rng(0)
    for k, r, batch in [(2, 1, 1), (4, 1, 1), (4, 2, 1), (4, 1, 64)]:
        p = rng.dirichlet(np.ones(10), size=(k, batch))
        a = coefficients(k, r)
        code = Code(a)
        coded = dict(enumerate(encode(p, a)))
        present = {i: p[i] for i in range(r, k)}
        code.decode(present, coded)  # warm the solver cache
        n = 20000 if batch == 1 else 2000
        seconds = timeit.timeit(lambda: code.decode(present, coded), number=n) / n  # noqa: B023
        print(
            f"k={k} r={r} batch={batch}: {seconds * 1e6:.1f} µs per decode ({seconds * 1e6 / batch:.2f} µs per query)"
        )


if __name__ == "__main__":
    main()
