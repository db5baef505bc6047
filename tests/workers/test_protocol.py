from __future__ import annotations

import numpy as np
import orjson
import pytest

from workers.protocol import ProtocolError, encode_binary_request, encode_response, parse_request, parse_response


def _json(shape: list[int], data: list, **extra) -> bytes:
    return orjson.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}], **extra})


@pytest.mark.parametrize("shape", [[2, 1, 28, 28], [2, 28, 28], [2, 784]])
def test_every_accepted_shape_becomes_images(shape):
    images, params, rid = parse_request(_json(shape, [0.5] * 1568, id="x"), None, 64, ())
    assert images.shape == (2, 1, 28, 28) and images.dtype == np.float32 and rid == "x" and params == {}


def test_binary_extension_round_trips():
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    body, length = encode_binary_request(x, {"stream": True}, "rid")
    images, params, rid = parse_request(body, length, 64, ("stream",))
    assert np.array_equal(images, x) and params == {"stream": True} and rid == "rid"


def test_nested_data_is_accepted():
    nested = [[0.1] * 784]
    images, _, _ = parse_request(_json([1, 784], nested), None, 64, ())
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
        parse_request(body, None, 64, ())


def test_binary_size_must_match_the_shape():
    body, length = encode_binary_request(np.zeros((1, 1, 28, 28), np.float32), {})
    with pytest.raises(ProtocolError, match="needs 3136"):
        parse_request(body[:-4], length, 64, ())


def test_header_length_beyond_the_body_is_refused():
    with pytest.raises(ProtocolError, match="does not fit"):
        parse_request(b"{}", 10, 64, ())


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
