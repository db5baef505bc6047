"""Hostile input against the real gateway process: the API fuzzed from its own OpenAPI schema
(schemathesis, valid and invalid data), then hand-picked abuse over raw HTTP. Zero 5xx, no process
crashes, and the gateway's resident memory does not grow from one fuzzing pass to the next."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from app.main import openapi_document
from bench.soak import rss_kib
from tests.integration.conftest import Running, request_body, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
LIMIT = 64 * 1024  # a small body limit, so the oversized cases stay cheap


@pytest.fixture(scope="module")
def fuzzed(coded_bundle) -> Iterator[Running]:
    with running(coded_bundle, env={"COINSERVE_MAX_BODY_BYTES": str(LIMIT)}) as service:
        yield service


schema = schemathesis.openapi.from_dict(openapi_document())  # what /openapi.json serves


def test_the_served_schema_is_the_fuzzed_one(fuzzed):
    assert httpx.get(f"{fuzzed.url}/openapi.json", timeout=5).json() == openapi_document()


def test_the_fuzzed_schema_has_tritons_extensions():
    """Triton's config, statistics and repository routes (app/routes/triton.py) are fuzzed below."""
    paths = openapi_document()["paths"]
    for path in [
        "/v2/models/stats",
        "/v2/models/{group}/stats",
        "/v2/models/{group}/versions/{version}/stats",
        "/v2/models/{group}/config",
        "/v2/models/{group}/versions/{version}/config",
        "/v2/repository/index",
        "/v2/repository/models/{model}/load",
        "/v2/repository/models/{model}/unload",
    ]:
        assert path in paths, path


def test_the_fuzzed_schema_has_the_detached_request_routes():
    """Issue 28: the poll route and the `ticket` that stands in for the bearer token are fuzzed below."""
    paths = openapi_document()["paths"]
    for path in ["/v1/requests/{request_id}", "/v1/requests/{request_id}/events"]:
        assert "ticket" in [p["name"] for p in paths[path]["get"]["parameters"]], path


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_from_the_schema_gets_a_5xx(case, fuzzed):
    """Every operation, with schema-valid and schema-violating data from schemathesis."""
    response = case.call(base_url=fuzzed.url, timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    content_type = response.headers.get("content-type") or [""]  # schemathesis: a list per header
    if response.status_code >= 400 and content_type[0].startswith("application/json"):
        assert "error" in response.json()


def raw(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 exchange on a raw socket: the status and what came back before the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        while True:  # the gateway closes the connection after a 413
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def post(fuzzed: Running, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{fuzzed.url}/v2/models/fashion/infer",
        content=body,
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=30,
    )


def test_oversized_body_is_refused_from_its_content_length_before_it_is_sent(fuzzed):
    """The head promises 1 GB and no body follows: a 413 arrives anyway, so nothing was read."""
    head = (
        b"POST /v2/models/fashion/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    status, data = raw(fuzzed.port, head)
    assert status == 413 and b"limit" in data


def test_oversized_chunked_body_is_cut_off_while_it_streams(fuzzed):
    """No Content-Length (chunked): the limit is enforced on the bytes as they arrive."""

    def chunks() -> Iterator[bytes]:
        for _ in range(LIMIT // 4096 + 4):
            yield b" " * 4096

    response = httpx.post(f"{fuzzed.url}/v2/models/fashion/infer", content=chunks(), timeout=30)
    assert response.status_code == 413


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 50_000,
        b'{"inputs": [' + b"[" * 20_000 + b"]" * 20_000 + b"]}",
        b"\xff\xfe\x00garbage",
        b'{"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": "\xc3\x28"}]}',
        b"",
        b"null",
    ],
    ids=["deep-array", "deep-inputs", "binary", "invalid-utf8", "empty", "null"],
)
def test_malformed_json_is_a_400(fuzzed, body):
    response = post(fuzzed, body)
    assert response.status_code == 400 and response.json()["error"]


def mutate(**changes: object) -> bytes:
    body = request_body(1)
    tensor = body["inputs"][0]
    for key, value in changes.items():
        if key == "parameters":
            body["parameters"] = value
        else:
            tensor[key] = value
    return orjson.dumps(body)


@pytest.mark.parametrize(
    "body, field",
    [
        (mutate(shape=[1, 3, 28, 28]), "shape"),
        (mutate(shape=[1, 1, 28]), "shape"),
        (mutate(shape=[-1, 1, 28, 28]), "shape"),
        (mutate(datatype="INT8"), "datatype"),
        (mutate(data=[[0.5, 0.5]] + [[0.5]] * 782), "ragged"),
        (mutate(data=["x"] * 784), "data"),
        (orjson.dumps(request_body(1)).replace(b"0.0,", b"NaN,", 1), "JSON"),
        (orjson.dumps(request_body(1)).replace(b"0.0,", b"Infinity,", 1), "JSON"),
        (orjson.dumps(request_body(1)).replace(b"0.0,", b"1e400,", 1), "infinity"),
        (mutate(parameters={"deadline_ms": 1}).replace(b'"deadline_ms":1', b'"deadline_ms":NaN'), "JSON"),
        (mutate(parameters={"deadline_ms": True}), "deadline_ms"),
        (mutate(parameters={"deadline_ms": -5}), "deadline_ms"),
        (mutate(parameters={"stop_margin": "high"}), "stop_margin"),
        (mutate(parameters={"temperature": 1}), "unknown parameters: ['temperature']"),
        (mutate(parameters={"binary_data_output": "yes"}), "binary_data_output"),
        (mutate(parameters={"members": ["member-9"]}), "members"),
        (orjson.dumps({**request_body(1), "extra": 1}), "unknown request fields"),
    ],
)
def test_wrong_shapes_types_and_values_name_the_problem(fuzzed, body, field):
    response = post(fuzzed, body)
    assert response.status_code == 400
    assert field.lower() in response.json()["error"].lower()


def binary(n: int = 1, size: object = None, pad: int = 0, values: float = 0.5) -> tuple[bytes, int]:
    """A binary-extension request for `n` images (→ body, header length); `size` overrides the
    declared binary_data_size and `pad` adds (or, negative, removes) bytes after the header."""
    data = np.full((n, 1, 28, 28), values, "<f4").tobytes()
    declared = len(data) if size is None else size
    tensor = {
        "name": "input",
        "shape": [n, 1, 28, 28],
        "datatype": "FP32",
        "parameters": {"binary_data_size": declared},
    }
    head = orjson.dumps({"inputs": [tensor]})
    data = data + b"\0" * pad if pad >= 0 else data[:pad]
    return head + data, len(head)


@pytest.mark.parametrize(
    "length, body, field",
    [
        ("99999", binary()[0], "does not fit"),
        ("0", binary()[0], "does not fit"),
        ("-3", binary()[0], "non-negative integer"),
        ("ten", binary()[0], "non-negative integer"),
        (str(binary()[1] - 5), binary()[0], "JSON"),
        (str(binary(pad=4)[1]), binary(pad=4)[0], "needs 3136"),
        (str(binary(pad=-1)[1]), binary(pad=-1)[0], "needs 3136"),
        (str(binary(size=12)[1]), binary(size=12)[0], "binary_data_size"),
        (str(binary(size="x")[1]), binary(size="x")[0], "binary_data_size"),
        (str(binary(values=float("nan"))[1]), binary(values=float("nan"))[0], "finite"),
        (None, binary()[0][: binary()[1]], "Inference-Header-Content-Length"),
    ],
    ids=["beyond", "zero", "negative", "text", "mid-json", "extra", "short", "size", "size-type", "nan", "no-header"],
)
def test_broken_binary_requests_name_the_problem(fuzzed, length, body, field):
    headers = {
        "Content-Type": "application/octet-stream",
        **({"Inference-Header-Content-Length": length} if length else {}),
    }
    response = post(fuzzed, body, headers)
    assert response.status_code == 400, response.text
    assert field.lower() in response.json()["error"].lower()


def test_huge_batch_is_refused_by_the_batch_limit(coded_bundle):
    """Within the body limit but beyond max_batch (64): a 400 naming the batch size."""
    with running(coded_bundle) as service:
        response = httpx.post(f"{service.url}/v2/models/fashion/infer", json=request_body(65), timeout=30)
        assert response.status_code == 400 and "batch size" in response.json()["error"]
        # the default 4 MiB body limit refuses a batch of 4096 images by its Content-Length
        huge = (
            b'{"inputs": [{"name": "input", "shape": [4096, 1, 28, 28], "datatype": "FP32", "data": ['
            + (b"0.5," * (4096 * 784))
            + b"0.5]}]}"
        )
        response = httpx.post(f"{service.url}/v2/models/fashion/infer", content=huge, timeout=30)
        assert response.status_code == 413


def hostile_pass(fuzzed: Running) -> None:
    bodies = [
        b"[" * 20_000,
        b"\xff" * 1000,
        mutate(shape=[64, 1, 28, 28]),
        mutate(datatype="BYTES"),
        orjson.dumps(request_body(8)),
        orjson.dumps(request_body(4, {"deadline_ms": 500})),
    ]
    for _ in range(25):
        for body in bodies:
            assert post(fuzzed, body).status_code < 500
        body, length = binary(4)
        assert post(fuzzed, body, {"Inference-Header-Content-Length": str(length)}).status_code < 500


def test_processes_survive_and_memory_stays_flat(fuzzed):
    """Runs last in this module: after everything above, every process is alive; then two more
    identical passes of hostile and valid calls leave the gateway's memory where the first left it."""
    gateway = fuzzed.child("gateway").process.pid
    hostile_pass(fuzzed)  # warm-up: allocator arenas, caches
    time.sleep(0.5)
    before = rss_kib(gateway)
    hostile_pass(fuzzed)
    hostile_pass(fuzzed)
    time.sleep(0.5)
    after = rss_kib(gateway)
    assert after < before * 1.10, (before, after)
    for child in fuzzed.cluster.children:
        assert child.process.poll() is None, f"{child.name} died"
