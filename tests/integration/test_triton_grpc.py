"""Triton's gRPC client from PyPI (`tritonclient.grpc`), unmodified, against the gateway's OIP v2
`GRPCInferenceService` (issue 14): health, metadata, ModelInfer with the JSON REST call's answers,
chosen outputs, versions, status codes, and ModelStreamInfer carrying coarse → refined → final."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.integration.conftest import Public, images_of, parse_sse, request_body
from tests.integration.test_triton_http import OUTPUTS, exact_json

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # the first to run pays for the session bundles


@pytest.fixture(scope="module")
def client(public: Public) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(url=f"127.0.0.1:{public.service.grpc_port}")
    yield c
    c.close()


def inputs_of(n: int) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("input", [n, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(images_of(n))
    return [tensor]


def exact_infer(client: grpcclient.InferenceServerClient, n: int, **kwargs) -> grpcclient.InferResult:
    for _ in range(5):
        result = client.infer("fashion", inputs_of(n), **kwargs)
        if not result.get_response().parameters["approximate"].bool_param:
            return result
    raise AssertionError("five answers in a row were approximate")


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fashion") and client.is_model_ready("fashion", "1")
    assert not client.is_model_ready("fashion", "2") and not client.is_model_ready("nope")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "coinserve" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("fashion", as_json=True)
    assert meta["versions"] == ["1"] and [o["name"] for o in meta["outputs"]] == OUTPUTS
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    with pytest.raises(InferenceServerException) as refused:
        client.get_model_metadata("fashion", "2")
    assert refused.value.status() == "StatusCode.NOT_FOUND"


def test_model_infer_gives_the_json_rest_answer(client, public):
    expected = exact_json(public, 3)
    result = exact_infer(client, 3, model_version="1")
    assert [o.name for o in result.get_response().outputs] == OUTPUTS
    for name in OUTPUTS:
        np.testing.assert_allclose(result.as_numpy(name), expected[name], rtol=0, atol=1e-6)


def test_requested_outputs_come_alone_in_their_order(client, public):
    expected = exact_json(public, 2)
    outputs = [grpcclient.InferRequestedOutput("ensemble"), grpcclient.InferRequestedOutput("member-2")]
    result = exact_infer(client, 2, outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == ["ensemble", "member-2"]
    np.testing.assert_allclose(result.as_numpy("member-2"), expected["member-2"], atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "code", "named"),
    [
        ({"outputs": [grpcclient.InferRequestedOutput("logits")]}, "INVALID_ARGUMENT", "'logits'"),
        ({"parameters": {"temperature": 1}}, "INVALID_ARGUMENT", "temperature"),
        ({"parameters": {"deadline_ms": -1}}, "INVALID_ARGUMENT", "deadline_ms"),
        ({"model_version": "2"}, "NOT_FOUND", "version '2'"),
    ],
    ids=["unknown-output", "unknown-parameter", "bad-deadline", "other-version"],
)
def test_refusals_map_to_grpc_status_codes(client, kwargs, code, named):
    with pytest.raises(InferenceServerException) as refused:
        client.infer("fashion", inputs_of(1), **kwargs)
    assert refused.value.status() == f"StatusCode.{code}" and named in refused.value.message()


def stream_events(client: grpcclient.InferenceServerClient, n: int, parameters: dict) -> list:
    """One request over ModelStreamInfer; its responses until the one marked final."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("fashion", inputs_of(n), parameters=parameters)
        got = []
        while True:
            result, error = responses.get(timeout=30)
            assert error is None, error
            got.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return got
    finally:
        client.stop_stream()


def test_stream_carries_the_sse_event_sequence_coarse_to_one_final(client, public):
    parameters = {"deadline_ms": 10_000}
    sse = parse_sse(
        httpx.post(
            f"{public.service.url}/v2/models/fashion/infer",
            json=request_body(1, parameters),
            headers={"Accept": "text/event-stream"},
            timeout=30,
        ).text
    )
    results = stream_events(client, 1, parameters)
    for kinds in ([e["event"] for e in sse], [r.get_response().parameters["event"].string_param for r in results]):
        assert kinds[0] == "coarse" and kinds[-1] == "final" and kinds.count("final") == 1
        assert set(kinds[1:-1]) <= {"refined"}
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r in results]
    assert finals == [False] * (len(results) - 1) + [True]
    seqs = [r.get_response().parameters["seq"].int64_param for r in results]
    assert seqs == list(range(1, len(results) + 1))
    assert results[0].get_response().parameters["resolution"].int64_param == 0
    assert int(np.argmax(results[-1].as_numpy("ensemble"))) == int(np.argmax(sse[-1]["data"]["outputs"][-1]["data"]))


def test_the_classification_extension_over_grpc(client, public):
    """`class_count=2` over gRPC: BYTES "score:index:label" strings, best first."""
    expected = exact_json(public, 1)["ensemble"][0]
    result = exact_infer(client, 1, outputs=[grpcclient.InferRequestedOutput("ensemble", class_count=2)])
    top = [e.decode().split(":", 2) for e in result.as_numpy("ensemble")[0]]
    assert [int(index) for _, index, _ in top] == list(np.argsort(-expected, kind="stable")[:2])
    np.testing.assert_allclose([float(score) for score, _, _ in top], np.sort(expected)[::-1][:2], atol=1e-5)
