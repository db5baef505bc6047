from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.coding import DecodingError, coefficients, condition_numbers, decode, encode
from models.errors import CodingShapeError


def _probs(rng: np.random.Generator, k: int, batch: int = 5, classes: int = 10) -> np.ndarray:
    logits = rng.normal(size=(k, batch, classes)) * 3
    p = np.exp(logits)
    return p / p.sum(axis=2, keepdims=True)


@pytest.mark.parametrize(("k", "r"), [(2, 1), (3, 1), (4, 1), (2, 2), (3, 2), (4, 2), (4, 3)])
def test_coefficient_rows_are_positive_mixtures(k, r):
    a = coefficients(k, r)
    assert a.shape == (r, k)
    assert np.all(a > 0) and np.allclose(a.sum(axis=1), 1.0)


def test_single_coded_model_uses_uniform_coefficients():
    assert np.array_equal(coefficients(4, 1), np.full((1, 4), 0.25))


def test_documented_worst_condition_numbers_for_two_coded_models():
    worst = {k: max(condition_numbers(coefficients(k, 2)).values()) for k in (2, 3, 4)}
    assert worst == pytest.approx({2: 1.41, 3: 2.82, 4: 5.36}, abs=0.01)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_exact_mixture_decodes_exactly_for_every_straggler(k):
    p = _probs(np.random.default_rng(k), k)
    a = coefficients(k, 1)
    coded = encode(p, a)[0]
    for j in range(k):
        recovered = decode(a, {i: p[i] for i in range(k) if i != j}, {0: coded})
        assert list(recovered) == [j]
        np.testing.assert_allclose(recovered[j], p[j], atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_two_coded_models_recover_any_two_erased_members(k):
    p = _probs(np.random.default_rng(10 + k), k)
    a = coefficients(k, 2)
    coded = encode(p, a)
    for missing in itertools.combinations(range(k), 2):
        present = {i: p[i] for i in range(k) if i not in missing}
        recovered = decode(a, present, {0: coded[0], 1: coded[1]})
        assert sorted(recovered) == list(missing)
        for j in missing:
            np.testing.assert_allclose(recovered[j], p[j], atol=1e-9)


def test_one_straggler_with_two_coded_models_uses_both_in_least_squares():
    p = _probs(np.random.default_rng(1), 4)
    a = coefficients(4, 2)
    coded = encode(p, a)
    recovered = decode(a, {0: p[0], 1: p[1], 3: p[3]}, {0: coded[0], 1: coded[1]})
    np.testing.assert_allclose(recovered[2], p[2], atol=1e-9)


def test_nothing_missing_decodes_nothing():
    p = _probs(np.random.default_rng(2), 2)
    assert decode(coefficients(2, 1), {0: p[0], 1: p[1]}, {}) == {}


def test_decoded_vectors_are_clipped_and_renormalised():
    a = coefficients(2, 1)
    member = np.array([[0.9, 0.1, 0.0]])
    coded = np.array([[0.2, 0.3, 0.5]])  # inconsistent: 2*coded - member has a negative entry
    out = decode(a, {0: member}, {0: coded})[1]
    assert np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0)
    np.testing.assert_allclose(out, [[0.0, 0.5 / 1.5, 1.0 / 1.5]])


def test_too_many_stragglers_is_a_decoding_error():
    p = _probs(np.random.default_rng(3), 3)
    with pytest.raises(DecodingError, match="cannot decode 2 missing members from 1 coded outputs"):
        decode(coefficients(3, 1), {0: p[0]}, {0: p[1]})


@pytest.mark.parametrize(
    ("members", "coded", "message"),
    [
        ({0: np.ones((2, 10)) / 10}, {0: np.ones((3, 10)) / 10}, "share one"),
        ({0: np.ones(10) / 10}, {0: np.ones(10) / 10}, r"\(B, C\) matrices"),
        ({0: np.full((1, 2), np.nan)}, {0: np.ones((1, 2)) / 2}, "finite"),
        ({5: np.ones((1, 2)) / 2}, {0: np.ones((1, 2)) / 2}, "member indices"),
    ],
)
def test_malformed_outputs_are_refused_with_a_clear_error(members, coded, message):
    with pytest.raises(CodingShapeError, match=message):
        decode(coefficients(2, 1), members, coded)


@pytest.mark.parametrize(
    ("coeffs", "message"),
    [([[0.5, 0.6]], "sum to 1"), ([[1.5, -0.5]], "positive"), ([[[0.5]]], r"\(r, k\) matrix")],
)
def test_bad_coefficients_are_refused(coeffs, message):
    with pytest.raises(CodingShapeError, match=message):
        decode(np.array(coeffs), {}, {})


def test_more_coded_models_than_members_is_refused():
    with pytest.raises(ValueError, match="r=3"):
        coefficients(2, 3)
