"""What the gateway checks in a request's body, alike on every surface (REST JSON, REST binary,
`/v1/requests`, gRPC): values inside the bundle's declared input range, finite numbers, the binary
extension's header, and a `model_name`/`model_version` in the body (KServe's request shape) that
names the served model. Real processes; Triton's gRPC client from PyPI."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from protocol.v2 import HEADER_LENGTH, NON_FINITE, encode_binary_request
from tests.integration.conftest import Public, images_of, request_body

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def grpc_client(public: Public) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(url=f"127.0.0.1:{public.service.grpc_port}")
    yield c
    c.close()


def json_body(images: np.ndarray, **extra: object) -> bytes:
    """As Python's json module writes it: NaN and infinities as the literals NaN and Infinity."""
    tensor = {"name": "input", "shape": list(images.shape), "datatype": "FP32", "data": images.ravel().tolist()}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def errors_of(public: Public, grpc_client: grpcclient.InferenceServerClient, images: np.ndarray) -> list[str]:
    """The 400's message from REST JSON, REST binary and /v1, and INVALID_ARGUMENT's from gRPC."""
    url, messages = public.service.url, []
    binary, length = encode_binary_request(images, {}, "input")
    for path, body, headers in [
        ("/v2/models/fashion/infer", json_body(images), {}),
        ("/v2/models/fashion/infer", binary, {HEADER_LENGTH: str(length)}),
        ("/v1/requests", json_body(images), {}),
    ]:
        response = httpx.post(url + path, content=body, headers=headers, timeout=30)
        assert response.status_code == 400, (path, response.text)
        messages.append(response.json()["error"])
    tensor = grpcclient.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    with pytest.raises(InferenceServerException) as refused:
        grpc_client.infer("fashion", [tensor])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    return [*messages, refused.value.message()]


@pytest.mark.parametrize("transform", [np.negative, lambda x: x * 255], ids=["negated", "times-255"])
def test_values_outside_the_declared_range_are_refused_on_every_surface(public, grpc_client, transform):
    images = transform(images_of(2)).astype(np.float32)
    flat = images.ravel()
    first = int(np.argmax((flat < 0) | (flat > 1)))
    expected = (
        "inputs[0].data: values must lie in the model's input range [0, 1]; "
        f"the first outside it is {flat[first]:g} at index {first}"
    )
    assert errors_of(public, grpc_client, images) == [expected] * 4


def test_in_range_images_are_answered_and_metadata_states_the_range(public):
    response = httpx.post(f"{public.service.url}/v2/models/fashion/infer", json=request_body(2), timeout=30)
    assert response.status_code == 200
    meta = httpx.get(f"{public.service.url}/v2/models/fashion", timeout=10).json()
    assert meta["parameters"]["input_range"] == [0.0, 1.0]


def test_non_finite_numbers_are_named_alike_on_every_surface(public, grpc_client):
    images = images_of(1)
    images.flat[3] = np.inf
    rest_json, binary, v1, grpc = errors_of(public, grpc_client, images)
    assert rest_json == v1 and rest_json.startswith(f"{NON_FINITE}: JSON has no such numbers (line 1, column ")
    assert binary == grpc == f"inputs[0].data: {NON_FINITE}; the first is inf at index 3"
    nan_json = orjson.dumps(request_body(1)).replace(b"0.0,", b"NaN,", 1)
    for path in ("/v2/models/fashion/infer", "/v1/requests"):
        response = httpx.post(public.service.url + path, content=nan_json, timeout=30)
        assert response.status_code == 400 and response.json()["error"].startswith(f"{NON_FINITE}: JSON has no")


def test_a_binary_body_without_its_header_length_is_told_it_needs_one(public):
    body, _ = encode_binary_request(np.full((1, 1, 28, 28), 0.3, np.float32), {}, "input")
    response = httpx.post(f"{public.service.url}/v2/models/fashion/infer", content=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"] == (
        "the body is not UTF-8 JSON; a binary request (a JSON header, then raw tensor bytes) "
        "needs the Inference-Header-Content-Length header"
    )


def test_the_body_may_name_its_model_as_kserve_does_but_only_the_served_one(public):
    url, images = public.service.url, images_of(1)
    ok = httpx.post(
        f"{url}/v2/models/fashion/versions/1/infer",
        content=json_body(images, id="mine", model_name="fashion", model_version="1"),
        timeout=30,
    )
    assert ok.status_code == 200 and ok.json()["id"] == "mine" and ok.json()["model_name"] == "fashion"
    refusals = [
        (
            "/v2/models/fashion/infer",
            {"model_name": "digits"},
            "the body's model_name 'digits' does not match the route's model 'fashion'",
        ),
        (
            "/v2/models/fashion/versions/1/infer",
            {"model_name": "fashion", "model_version": "2"},
            "the body's model_version '2' does not match the route's model's version '1'",
        ),
        (
            "/v1/requests",
            {"model_name": "digits"},
            "the body's model_name 'digits' does not match the served model group 'fashion'",
        ),
    ]
    for path, extra, message in refusals:
        response = httpx.post(url + path, content=json_body(images, **extra), timeout=30)
        assert response.status_code == 400 and response.json() == {"error": message}
