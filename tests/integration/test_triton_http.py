"""Triton's HTTP client from PyPI (`tritonclient.http`), unmodified, against the real gateway: health,
metadata, JSON and binary inputs, binary outputs, chosen outputs and the versioned routes, with the
same answers as the plain JSON REST call for the same images (issue 14)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.integration.conftest import Public, images_of, request_body

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # the first to run pays for the session bundles
OUTPUTS = ["member-0", "member-1", "member-2", "ensemble"]


@pytest.fixture(scope="module")
def client(public: Public) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{public.service.port}")
    yield c
    c.close()


def exact_json(public: Public, n: int, parameters: dict | None = None) -> dict[str, np.ndarray]:
    """The plain JSON REST answer for the first `n` test images, retried until no member was decoded
    (a decoded answer is close to the exact one, not equal)."""
    for _ in range(5):
        body = request_body(n, parameters)
        data = httpx.post(f"{public.service.url}/v2/models/fashion/infer", json=body, timeout=30).json()
        if not data["parameters"]["approximate"]:
            return {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in data["outputs"]}
    raise AssertionError("five answers in a row were approximate")


def triton_infer(client: httpclient.InferenceServerClient, n: int, **kwargs) -> httpclient.InferResult:
    binary_input = kwargs.pop("binary_input", True)
    for _ in range(5):
        tensor = httpclient.InferInput("input", [n, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(images_of(n), binary_data=binary_input)
        result = client.infer("fashion", [tensor], **kwargs)
        if not result.get_response()["parameters"]["approximate"]:
            return result
    raise AssertionError("five answers in a row were approximate")


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fashion") and client.is_model_ready("fashion", "1")
    assert not client.is_model_ready("fashion", "2") and not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server["name"] == "coinserve" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("fashion")
    assert meta["versions"] == ["1"] and meta["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
    ]
    assert [o["name"] for o in meta["outputs"]] == OUTPUTS
    assert client.get_model_metadata("fashion", "1")["outputs"] == meta["outputs"]
    with pytest.raises(InferenceServerException, match="no version '2'"):
        client.get_model_metadata("fashion", "2")


@pytest.mark.parametrize("binary_input", [False, True], ids=["json-input", "binary-input"])
def test_infer_gives_the_json_rest_answer(client, public, binary_input):
    """The client's default call: every output, returned binary (`binary_data_output`)."""
    expected = exact_json(public, 3)
    result = triton_infer(client, 3, binary_input=binary_input)
    assert [o["name"] for o in result.get_response()["outputs"]] == OUTPUTS
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    for name in OUTPUTS:
        np.testing.assert_allclose(result.as_numpy(name), expected[name], rtol=0, atol=1e-6)


def test_requested_outputs_come_alone_in_their_order_binary_or_json(client, public):
    expected = exact_json(public, 2)
    outputs = [
        httpclient.InferRequestedOutput("ensemble"),
        httpclient.InferRequestedOutput("member-1", binary_data=False),
    ]
    result = triton_infer(client, 2, outputs=outputs)
    listed = result.get_response()["outputs"]
    assert [o["name"] for o in listed] == ["ensemble", "member-1"]
    assert "binary_data_size" in listed[0]["parameters"] and "data" in listed[1]
    np.testing.assert_allclose(result.as_numpy("ensemble"), expected["ensemble"], atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("member-1"), expected["member-1"], atol=1e-6)


def test_the_versioned_route_answers_and_another_version_is_404(client, public):
    expected = exact_json(public, 1)
    result = triton_infer(client, 1, model_version="1")
    np.testing.assert_allclose(result.as_numpy("ensemble"), expected["ensemble"], atol=1e-6)
    with pytest.raises(InferenceServerException) as refused:
        triton_infer(client, 1, model_version="2")
    assert refused.value.status() == "404"


def test_an_unknown_output_is_a_400_naming_it(client):
    with pytest.raises(InferenceServerException) as refused:
        triton_infer(client, 1, outputs=[httpclient.InferRequestedOutput("logits")])
    assert refused.value.status() == "400" and "'logits'" in refused.value.message()


def test_triton_parameters_are_understood_and_unknown_ones_named(client):
    """`priority`, `timeout` and sequence ids are Triton's: accepted, without effect; a name nobody
    defined is a 400 that names it."""
    result = triton_infer(client, 1, priority=1, timeout=1_000_000, sequence_id=7, parameters={"deadline_ms": 5000})
    assert result.as_numpy("ensemble").shape == (1, 10)
    with pytest.raises(InferenceServerException) as refused:
        triton_infer(client, 1, parameters={"temperature": 1})
    assert refused.value.status() == "400" and "temperature" in refused.value.message()


@pytest.mark.parametrize("binary", [True, False])
def test_the_classification_extension_gives_the_top_classes_with_labels(client, public, binary):
    """`class_count=3` (Triton's classification extension): the top three classes of the ensemble,
    best first, as "score:index:label" strings with the bundle's labels."""
    expected = exact_json(public, 2)["ensemble"]
    result = triton_infer(client, 2, outputs=[httpclient.InferRequestedOutput("ensemble", binary, class_count=3)])
    top = result.as_numpy("ensemble")
    assert top.shape == (2, 3)
    labels = httpx.get(f"{public.service.url}/v2/models/fashion", timeout=10).json()["parameters"]["labels"]
    for row, probs in zip(top, expected, strict=True):
        entries = [(e.decode() if isinstance(e, bytes) else e).split(":", 2) for e in row]
        indices = [int(index) for _, index, _ in entries]
        assert indices == list(np.argsort(-probs, kind="stable")[:3])
        assert [label for _, _, label in entries] == [labels[i] for i in indices]
        np.testing.assert_allclose([float(score) for score, _, _ in entries], probs[indices], atol=1e-5)
