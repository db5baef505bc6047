"""The request parser under hypothesis: whatever the bytes, it returns a valid request or raises
the one 400 error type, never anything else (anything else would be a 500)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from app.errors import BadRequestError
from app.group import Group
from app.settings import GatewaySettings
from app.validation import parse
from protocol.spec import InputSpec, ModelSpec

PIXELS = 28 * 28
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _spec(classes: int, labels: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec("g", InputSpec("input", (1, 28, 28)), classes, labels)


@pytest.fixture(scope="module")
def group() -> Group:
    members = ["member-0", "member-1", "member-2"]
    return Group(
        "fashion", members, {"coded": 0}, np.full((1, 3), 1 / 3), 2, [4, None], _spec(10, tuple("abcdefghij")), {}
    )


def check(body: bytes, group: Group) -> None:
    try:
        images, options, _ = parse(body, group, GatewaySettings(bundle=Path("unused")), stream=False)
    except BadRequestError as exc:
        assert str(exc)  # every refusal says why
        return
    assert images.dtype == np.float32 and images.shape[1:] == (1, 28, 28) and 1 <= len(images) <= 64
    assert np.isfinite(images).all()
    assert options.deadline_ms is None or 0 < options.deadline_ms


def valid(n: int = 1) -> dict:
    return {"inputs": [{"name": "input", "shape": [n, 1, 28, 28], "datatype": "FP32", "data": [0.5] * (n * PIXELS)}]}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=256))
def test_any_bytes(group, body):
    check(body, group)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(JSON)
def test_any_json_document(group, document):
    check(json.dumps(document).encode(), group)  # stdlib: big integers, NaN literals


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(-3, 70), max_size=5) | JSON,
    datatype=st.sampled_from(["FP32", "FP16", "INT8", "BYTES", "fp32", ""]) | JSON,
    value=st.floats() | st.integers() | st.text(max_size=3) | st.none(),
    parameters=st.dictionaries(
        st.sampled_from(["deadline_ms", "stop_margin", "min_resolution", "members", "priority"]), JSON, max_size=3
    ),
)
def test_mutated_valid_requests(group, shape, datatype, value, parameters):
    body = valid(1)
    body["inputs"][0].update(shape=shape, datatype=datatype)
    body["inputs"][0]["data"][7] = value
    body["parameters"] = parameters
    check(json.dumps(body).encode(), group)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deeper than any parser should recurse
        b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"\xff\xfe{not utf-8}",
        b'{"inputs": "\xed\xa0\x80"}',  # a lone surrogate, invalid UTF-8
        orjson.dumps(valid(65)),  # one image beyond the batch limit
        orjson.dumps(valid(1)).replace(b"0.5", b"NaN", 1),
        orjson.dumps(valid(1)).replace(b"0.5", b"1e999", 1),  # overflows to infinity
    ],
    ids=["deep-array", "deep-inputs", "invalid-utf8", "lone-surrogate", "batch-65", "nan", "overflow"],
)
def test_hostile_bodies_are_refused_with_a_reason(group, body):
    with pytest.raises(BadRequestError):
        parse(body, group, GatewaySettings(bundle=Path("unused")), stream=False)
