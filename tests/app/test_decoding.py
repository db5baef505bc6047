from __future__ import annotations

import numpy as np

from app.decoding import Answer, Decoder
from models.coding import coefficients, encode


def _probs(seed: int, k: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(10), size=(k, 2))


def _decoder() -> Decoder:
    return Decoder(["a", "b", "c"], {"coded": 0}, coefficients(3, 1), final=1)


def test_real_answers_pass_through_untouched():
    p = _probs(0)
    real = {m: Answer(p[i], 1, True) for i, m in enumerate("abc")}
    assert _decoder().answers(real, {}, ["a", "b", "c"]) == real


def test_missing_member_is_decoded_at_the_lowest_ingredient_resolution():
    p = _probs(1)
    coded = {"coded": Answer(encode(p, coefficients(3, 1))[0], 1, True)}
    real = {"a": Answer(p[0], 1, True), "c": Answer(p[2], 0, True)}
    out = _decoder().answers(real, coded, ["a", "b", "c"])
    assert out["b"].real is False and out["b"].resolution == 0
    np.testing.assert_allclose(out["b"].probs, p[1], atol=1e-9)


def test_member_stuck_below_the_final_resolution_is_decoded_at_the_final_one():
    p = _probs(2)
    coded = {"coded": Answer(encode(p, coefficients(3, 1))[0], 1, True)}
    real = {"a": Answer(p[0], 1, True), "b": Answer(p[1] * 0 + 0.1, 0, True), "c": Answer(p[2], 1, True)}
    out = _decoder().answers(real, coded, ["a", "b", "c"])
    assert out["b"].key == (1, False)
    np.testing.assert_allclose(out["b"].probs, p[1], atol=1e-9)


def test_two_missing_members_with_one_coded_output_stay_missing():
    p = _probs(3)
    coded = {"coded": Answer(encode(p, coefficients(3, 1))[0], 1, True)}
    out = _decoder().answers({"a": Answer(p[0], 1, True)}, coded, ["a", "b", "c"])
    assert set(out) == {"a"}


def test_without_a_code_nothing_is_decoded():
    decoder = Decoder(["a", "b"], {}, None, final=1)
    p = _probs(4, 2)
    assert set(decoder.answers({"a": Answer(p[0], 1, True)}, {}, ["a", "b"])) == {"a"}
