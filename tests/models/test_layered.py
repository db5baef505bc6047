from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.layered import decode_layer, digits, encode_rows, generator, layer_terms, worker_layer
from models.layered_sim import SimConfig, simulate


def test_digits_split_and_rebuild_signed_values():
    v = np.array([-255, -16, 0, 7, 200])
    d = digits(v, m=2, b=4)
    assert np.array_equal(16 * d[0] + d[1], v)
    assert all(np.abs(x).max() < 16 for x in d)


def test_layers_hold_products_by_significance():
    assert [len(t) for t in layer_terms(3)] == [1, 2, 3, 2, 1]


def test_layered_coded_product_is_exact_from_any_k_of_n_workers():
    rng = np.random.default_rng(0)
    m, b, n, k = 2, 4, 5, 3
    a = rng.integers(-255, 256, size=(12, 9))
    x = rng.integers(-255, 256, size=9)
    g = generator(n, k)
    coded = [encode_rows(d, g) for d in digits(a, m, b)]  # [digit][worker]
    x_d = digits(x, m, b)
    a_d = digits(a, m, b)
    for subset in itertools.combinations(range(n), k):
        running = np.zeros(12, dtype=np.int64)
        for ell in range(len(layer_terms(m))):
            results = {w: worker_layer([coded[i][w] for i in range(m)], x_d, ell, m, b) for w in subset}
            running = running + decode_layer(g, results)
            expected = sum(
                (1 << ((2 * m - 2 - i - j) * b)) * (a_d[i] @ x_d[j]) for t in layer_terms(m)[: ell + 1] for i, j in t
            )
            assert np.array_equal(running, expected)
        assert np.array_equal(running, a @ x)


def test_decoding_needs_k_results():
    with pytest.raises(ValueError, match="need 3"):
        decode_layer(generator(5, 3), {0: np.zeros(2, dtype=np.int64)})


def test_simulation_with_real_processes_is_exact_and_first_layers_meet_deadlines_first():
    [layered, one_shot] = simulate(SimConfig(jobs=12, size=30), deadlines=[3])
    assert layered.exact_layers == layered.checked_layers > 0
    assert one_shot.exact_layers == one_shot.checked_layers > 0
    success = layered.layer_success
    assert success[0] >= success[1] >= success[2]
