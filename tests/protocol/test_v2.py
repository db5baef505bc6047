from __future__ import annotations

import numpy as np
import orjson
import pytest

from protocol.spec import InputSpec
from protocol.v2 import (
    ProtocolError,
    RequestedOutput,
    encode_binary_request,
    encode_outputs,
    encode_response,
    parse_infer,
    parse_request,
    parse_response,
)

SPEC = InputSpec("input", (1, 28, 28))


def _json(shape: list[int], data: list, **extra) -> bytes:
    return orjson.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}], **extra})


@pytest.mark.parametrize("shape", [[2, 1, 28, 28], [2, 28, 28], [2, 784]])
def test_every_accepted_shape_becomes_images(shape):
    images, params, rid = parse_request(_json(shape, [0.5] * 1568, id="x"), None, 64, (), SPEC)
    assert images.shape == (2, 1, 28, 28) and images.dtype == np.float32 and rid == "x" and params == {}


def test_binary_extension_round_trips():
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    body, length = encode_binary_request(x, {"stream": True}, "input", "rid")
    images, params, rid = parse_request(body, length, 64, ("stream",), SPEC)
    assert np.array_equal(images, x) and params == {"stream": True} and rid == "rid"


def test_nested_data_is_accepted():
    nested = [[0.1] * 784]
    images, _, _ = parse_request(_json([1, 784], nested), None, 64, (), SPEC)
    assert images.shape == (1, 1, 28, 28)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1, 2]", "must be a JSON object"),
        (b'{"inputs": [], "extra": 1}', "unknown request fields"),
        (_json([1, 784], ["a"] * 784), "only numbers"),
        (_json([1, 784], [True] * 784), "only numbers"),
        (_json([65, 784], [0] * 65 * 784), "batch size must be between 1 and 64"),
        (_json([0, 784], []), "batch size must be between 1 and 64"),
        (_json([1, 784], [1e39] * 784), "finite"),
        (_json([1, 784], [[1, 2], [3]]), "ragged"),
        (_json([1, -784], []), "non-negative integers"),
        (_json([1, 784], [0] * 784, parameters={"x": 1}), "unknown parameters: ['x']"),
        (_json([1, 784], [0] * 784, id=5), "id must be a string"),
    ],
)
def test_malformed_requests_name_the_problem(body, message):
    with pytest.raises(ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_request(body, None, 64, (), SPEC)


def test_binary_size_must_match_the_shape():
    body, length = encode_binary_request(np.zeros((1, 1, 28, 28), np.float32), {}, "input")
    with pytest.raises(ProtocolError, match="needs 3136"):
        parse_request(body[:-4], length, 64, (), SPEC)


def test_header_length_beyond_the_body_is_refused():
    with pytest.raises(ProtocolError, match="does not fit"):
        parse_request(b"{}", 10, 64, (), SPEC)


def test_response_round_trip_and_garbage_refusal():
    probs = np.full((2, 10), 0.1)
    body = encode_response("m", probs, {"resolution": 1})
    parsed, params = parse_response(body, 10, 2)
    np.testing.assert_allclose(parsed, probs, rtol=1e-6) and None
    assert params == {"resolution": 1}
    with pytest.raises(ProtocolError, match="shape"):
        parse_response(body, 10, 3)
    with pytest.raises(ProtocolError, match="negative"):
        parse_response(encode_response("m", -probs, {}), 10, 2)
    with pytest.raises(ProtocolError, match="not valid JSON"):
        parse_response(body[:20], 10, 2)


def _binary_header(n: int = 1, **extra) -> tuple[bytes, int]:
    data = np.zeros((n, 1, 28, 28), "<f4").tobytes()
    tensor = {
        "name": "input",
        "shape": [n, 1, 28, 28],
        "datatype": "FP32",
        "parameters": {"binary_data_size": len(data)},
    }
    head = orjson.dumps({"inputs": [tensor], **extra})
    return head + data, len(head)


def test_triton_parameters_are_understood_or_knowingly_ignored():
    body = _json(
        [1, 784],
        [0.0] * 784,
        parameters={"binary_data_output": True, "priority": 1, "timeout": 10, "sequence_id": 3, "deadline_ms": 5},
    )
    parsed = parse_infer(body, None, 64, ("deadline_ms",), SPEC)
    assert parsed.binary_output is True and parsed.outputs is None and parsed.parameters == {"deadline_ms": 5}


def test_an_undefined_parameter_is_named():
    with pytest.raises(ProtocolError, match=r"unknown parameters: \['temperature'\]"):
        parse_infer(_json([1, 784], [0.0] * 784, parameters={"temperature": 1}), None, 64, (), SPEC)


def test_requested_outputs_keep_their_order_and_binary_flags():
    outputs = [{"name": "b", "parameters": {"binary_data": True}}, {"name": "a"}]
    parsed = parse_infer(_json([1, 784], [0.0] * 784, outputs=outputs), None, 64, (), SPEC, ["a", "b"])
    assert parsed.outputs == [RequestedOutput("b", True), RequestedOutput("a", False)]


@pytest.mark.parametrize(
    ("outputs", "match"),
    [
        ([{"name": "logits"}], r"unknown output 'logits'; outputs are \['a', 'b'\]"),
        ([{"name": "a"}, {"name": "a"}], "asked for twice"),
        ([{"name": "a", "parameters": {"classification": 0}}], "classification must be a positive integer"),
        ([{"name": "a", "parameters": {"classification": "3"}}], "classification must be a positive integer"),
        ([{"name": "a", "parameters": {"binary_data": "yes"}}], "binary_data must be true or false"),
        ([{"name": "a", "parameters": {"colour": 1}}], "unknown parameter 'colour'"),
    ],
)
def test_bad_requested_outputs_are_named(outputs, match):
    with pytest.raises(ProtocolError, match=match):
        parse_infer(_json([1, 784], [0.0] * 784, outputs=outputs), None, 64, (), SPEC, ["a", "b"])


def test_binary_input_checks_its_declared_size_and_header():
    body, length = _binary_header()
    assert parse_infer(body, length, 64, (), SPEC).images.shape == (1, 1, 28, 28)
    with pytest.raises(ProtocolError, match="needs the Inference-Header-Content-Length header"):
        parse_infer(body[:length], None, 64, (), SPEC)
    shm = orjson.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1, 784], "datatype": "FP32", "parameters": {"shared_memory_region": "r"}}
            ]
        }
    )
    with pytest.raises(ProtocolError, match="shared memory is not supported"):
        parse_infer(shm, None, 64, (), SPEC)


def test_binary_outputs_follow_the_json_header():
    a, b = np.arange(4, dtype=np.float32).reshape(2, 2), np.ones((2, 2), np.float32)
    body, length = encode_outputs({"model_name": "m"}, [("a", a, True), ("b", b, False)])
    assert length is not None
    head = orjson.loads(body[:length])
    assert head["outputs"][0] == {
        "name": "a",
        "datatype": "FP32",
        "shape": [2, 2],
        "parameters": {"binary_data_size": 16},
    }
    assert head["outputs"][1]["data"] == [1.0] * 4
    assert np.array_equal(np.frombuffer(body[length:], "<f4").reshape(2, 2), a)
    assert encode_outputs({"model_name": "m"}, [("b", b, False)])[1] is None


def test_the_classification_extension_names_the_top_classes():
    from protocol.v2 import classification, encode_outputs, tensor_bytes

    outputs = [{"name": "a", "parameters": {"classification": 2}}]
    parsed = parse_infer(_json([1, 784], [0.0] * 784, outputs=outputs), None, 64, (), SPEC, ["a", "b"])
    assert parsed.outputs == [RequestedOutput("a", False, 2)]
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    top = classification(probs, 2, ["x", "y", "z"])
    assert top.tolist() == [["0.700000:1:y", "0.200000:2:z"], ["0.500000:0:x", "0.300000:2:z"]]
    assert classification(probs, 5).tolist()[0] == ["0.700000:1", "0.200000:2", "0.100000:0"]
    body, length = encode_outputs({}, [("a", top, False)])
    assert length is None and orjson.loads(body)["outputs"][0] == {
        "name": "a",
        "datatype": "BYTES",
        "shape": [2, 2],
        "data": top.ravel().tolist(),
    }
    raw = tensor_bytes(top[:1, :1])
    assert raw == len(b"0.700000:1:y").to_bytes(4, "little") + b"0.700000:1:y"


def test_kserve_request_shape_is_parsed():
    """KServe's client sends `id` and `model_name` (and may send `model_version`) in the body."""
    body = _json([1, 784], [0.0] * 784, id="k-1", model_name="fashion", model_version="1")
    parsed = parse_infer(body, None, 64, (), SPEC)
    assert (parsed.request_id, parsed.model_name, parsed.model_version) == ("k-1", "fashion", "1")
    bare = parse_infer(_json([1, 784], [0.0] * 784, model_version=""), None, 64, (), SPEC)
    assert bare.model_name is None and bare.model_version is None
    with pytest.raises(ProtocolError, match="model_name and model_version must be strings"):
        parse_infer(_json([1, 784], [0.0] * 784, model_name=3), None, 64, (), SPEC)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_json_numbers_say_so(literal):
    body = _json([1, 784], [0.0] * 784).replace(b"0.0,", literal + b",", 1)
    with pytest.raises(ProtocolError, match=r"^non-finite numbers \(NaN, Infinity\) are not allowed: JSON"):
        parse_infer(body, None, 64, (), SPEC)


def test_non_finite_binary_values_say_so_alike_with_their_index():
    x = np.zeros((1, 1, 28, 28), np.float32)
    x.flat[7] = np.nan
    body, length = encode_binary_request(x, {}, "input")
    with pytest.raises(
        ProtocolError, match=r"non-finite numbers \(NaN, Infinity\) are not allowed; the first is nan at index 7"
    ):
        parse_infer(body, length, 64, (), SPEC)


def test_a_binary_body_without_its_header_length_is_named():
    body, _ = encode_binary_request(np.full((1, 1, 28, 28), 0.3, np.float32), {}, "input")
    with pytest.raises(
        ProtocolError, match="not UTF-8 JSON; a binary request .* needs the Inference-Header-Content-Length"
    ):
        parse_infer(body, None, 64, (), SPEC)
    zeros, _ = encode_binary_request(np.zeros((1, 1, 28, 28), np.float32), {}, "input")  # valid UTF-8 after the JSON
    with pytest.raises(ProtocolError, match="needs the Inference-Header-Content-Length header"):
        parse_infer(zeros, None, 64, (), SPEC)


RANGED = InputSpec("input", (1, 28, 28), range=(0.0, 1.0))


@pytest.mark.parametrize("binary", [False, True])
def test_values_outside_the_declared_range_name_it_and_the_first_offender(binary):
    x = np.full((2, 1, 28, 28), 0.5, np.float32)
    x.flat[900], x.flat[1000] = 255.0, -1.0
    body, length = (
        encode_binary_request(x, {}, "input") if binary else (_json([2, 1, 28, 28], x.ravel().tolist()), None)
    )
    with pytest.raises(ProtocolError, match=r"input range \[0, 1\]; the first outside it is 255 at index 900"):
        parse_infer(body, length, 64, (), RANGED)
    x.flat[900], x.flat[1000] = 1.0, 0.0  # the bounds themselves are inside
    body, length = (
        encode_binary_request(x, {}, "input") if binary else (_json([2, 1, 28, 28], x.ravel().tolist()), None)
    )
    assert parse_infer(body, length, 64, (), RANGED).images.shape == (2, 1, 28, 28)
    assert parse_infer(_json([1, 784], [-3.0] * 784), None, 64, (), SPEC).images.min() == -3  # no range: unchecked
