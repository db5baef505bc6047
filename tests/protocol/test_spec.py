"""The model contract a manifest states, and the codec shaped by it (protocol/spec.py)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from protocol.spec import FORMAT, FORMAT_V1, InputSpec, SpecError, input_spec, model_spec
from protocol.v2 import ProtocolError, encode_binary_request, parse_infer


def _body(name: str, shape: list[int], values: int) -> bytes:
    return orjson.dumps({"inputs": [{"name": name, "shape": shape, "datatype": "FP32", "data": [0.25] * values}]})


@pytest.mark.parametrize(
    ("spec", "rows", "accepted"),
    [
        (InputSpec("x", (16,)), [[16]], [(16,)]),
        (InputSpec("x", (1, 8, 8)), [[1, 8, 8], [8, 8], [64]], [(1, 8, 8), (8, 8), (64,)]),
        (InputSpec("img", (3, 32, 32)), [[3, 32, 32], [3072]], [(3, 32, 32), (3072,)]),
    ],
)
def test_requests_take_the_shape_the_spec_states(spec, rows, accepted):
    assert spec.accepted() == accepted
    for row in rows:
        parsed = parse_infer(_body(spec.name, [2, *row], 2 * spec.size), None, 64, (), spec)
        assert parsed.images.shape == (2, *spec.shape) and parsed.images.dtype == np.float32


def test_a_shape_or_name_the_spec_does_not_state_is_refused_by_name():
    spec = InputSpec("features", (16,))
    with pytest.raises(ProtocolError, match=r"shape must be \[B, 16\], got \[1, 1, 28, 28\]"):
        parse_infer(_body("features", [1, 1, 28, 28], 784), None, 64, (), spec)
    with pytest.raises(ProtocolError, match="name must be 'features'"):
        parse_infer(_body("input", [1, 16], 16), None, 64, (), spec)


def test_binary_requests_carry_the_spec_name_and_shape():
    spec = InputSpec("img", (3, 4, 4))
    x = np.random.default_rng(0).random((2, 3, 4, 4), dtype=np.float32)
    body, length = encode_binary_request(x, {}, spec.name)
    assert np.array_equal(parse_infer(body, length, 64, (), spec).images, x)


def test_v2_and_v1_manifests_state_their_contract():
    v2 = {
        "format": FORMAT,
        "name": "digits",
        "input": {"name": "pixels", "shape": [1, 8, 8], "datatype": "FP32"},
        "output": {"classes": 3, "labels": ["a", "b", "c"]},
    }
    spec = model_spec(v2)
    assert (spec.group, spec.input, spec.classes, spec.labels) == (
        "digits",
        InputSpec("pixels", (1, 8, 8)),
        3,
        ("a", "b", "c"),
    )
    assert spec.label(1) == "b"
    v1 = {
        "format": FORMAT_V1,
        "dataset": {"input_shape": [1, 28, 28], "classes": list("abcdefghij")},
        "config": {"classes": 10},
    }
    old = model_spec(v1)
    assert old.group == "fashion" and old.input == InputSpec("input", (1, 28, 28)) and old.classes == 10


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"name": "x", "shape": []}, "shape must list"),
        ({"name": "x", "shape": [0]}, "shape must list"),
        ({"name": "x", "shape": [4], "datatype": "INT8"}, "datatype 'INT8' is not supported"),
        ({"name": "", "shape": [4]}, "name must be"),
        ({"name": "x", "shape": [4], "dims": 1}, "unknown fields"),
        ([1], "must be an object"),
    ],
)
def test_bad_input_specs_name_the_field(value, message):
    with pytest.raises(SpecError, match=message):
        input_spec(value)


def test_labels_and_classes_must_agree():
    base = {"format": FORMAT, "name": "g", "input": {"name": "x", "shape": [4]}}
    with pytest.raises(SpecError, match="2 labels but classes is 3"):
        model_spec({**base, "output": {"labels": ["a", "b"], "classes": 3}})
    with pytest.raises(SpecError, match="needs 'labels'"):
        model_spec({**base, "output": {}})


def test_an_input_may_declare_its_valid_range():
    spec = input_spec({"name": "x", "shape": [4], "range": [0, 1]})
    assert spec.range == (0.0, 1.0) and spec.to_dict()["range"] == [0.0, 1.0]
    assert spec.metadata() == {"name": "x", "datatype": "FP32", "shape": [-1, 4]}  # OIP tensor metadata has no range
    assert input_spec({"name": "x", "shape": [4]}).range is None
    for bad in ([1, 0], [0], [0, float("inf")], ["0", 1], [True, 2], 5):
        with pytest.raises(SpecError, match=r"input.range must be \[low, high\]"):
            input_spec({"name": "x", "shape": [4], "range": bad})
