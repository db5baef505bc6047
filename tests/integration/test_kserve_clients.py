"""KServe's own Python client library (`kserve` 0.21, unmodified, from PyPI) against a real cluster:
`InferenceRESTClient` over REST v2 with JSON and with binary tensors, and `InferenceGRPCClient`.

KServe's generated gRPC code registers the same protobuf names as Triton's client, which this
process imports for other tests, so the library runs in a process of its own, inside its own
venv (bench/peers/venvs.py: made on first use, about a minute), and reports what it got as JSON
(tests/integration/kserve_client.py).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.peers import venvs
from tests.integration.conftest import Public, images_of
from tests.integration.test_triton_http import exact_json

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # the first run makes kserve's venv
SCRIPT = Path(__file__).with_name("kserve_client.py")


@pytest.fixture(scope="module")
def kserve_calls(public: Public, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python = venvs.ensure("kserve")
    images = tmp_path_factory.mktemp("kserve") / "images.npy"
    np.save(images, images_of(2))
    address = f"127.0.0.1:{public.service.grpc_port}"
    done = subprocess.run(
        [str(python), str(SCRIPT), public.service.url, address, str(images)],
        capture_output=True,
        text=True,
        timeout=180,
        env=venvs.env_for(),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("call", "request_id"), [("rest_json", "kserve-json"), ("rest_binary", "kserve-binary")])
def test_rest_inference_is_answered_as_the_library_expects(kserve_calls, public, call, request_id):
    got = kserve_calls[call]
    assert "error" not in got, got
    assert got["id"] == request_id and got["model_name"] == "fashion"
    assert list(got["outputs"]) == ["ensemble", "member-0"]
    expected = exact_json(public, 2)["ensemble"]
    assert np.asarray(got["outputs"]["ensemble"]).shape == (2, 10)
    assert np.argmax(got["outputs"]["ensemble"], axis=1).tolist() == np.argmax(expected, axis=1).tolist()
    assert isinstance(got["parameters"]["approximate"], bool)


def test_the_id_the_library_makes_up_comes_back(kserve_calls):
    uuid.UUID(kserve_calls["rest_fresh_id"]["id"])  # to_rest() fills a fresh uuid4 when none is given


def test_a_body_naming_another_model_is_a_400_naming_both(kserve_calls):
    got = kserve_calls["rest_other_model"]
    assert got["status"] == 400
    assert got["error"] == "the body's model_name 'digits' does not match the route's model 'fashion'"


def test_out_of_range_inputs_are_refused_over_rest_and_grpc(kserve_calls):
    scaled = (images_of(2) * 255).ravel()
    first = int(np.argmax(scaled > 1))
    rest = kserve_calls["rest_out_of_range"]
    assert rest["status"] == 400 and "input range [0, 1]" in rest["error"]
    assert rest["error"].endswith(f"the first outside it is {scaled[first]:g} at index {first}")
    grpc = kserve_calls["grpc_out_of_range"]
    negated = -images_of(2).ravel()
    first = int(np.argmax(negated < 0))
    assert grpc["code"] == "INVALID_ARGUMENT"
    assert grpc["error"].endswith(f"the first outside it is {negated[first]:g} at index {first}")


def test_grpc_inference_with_typed_contents_is_answered_alike(kserve_calls, public):
    """The tensor as typed `fp32_contents` (KServe's non-binary gRPC request), not raw bytes."""
    got = kserve_calls["grpc_typed"]
    assert "error" not in got, got
    assert got["id"] == "kserve-grpc-typed" and got["model_name"] == "fashion"
    expected = exact_json(public, 2)["ensemble"]
    assert np.argmax(got["outputs"]["ensemble"], axis=1).tolist() == np.argmax(expected, axis=1).tolist()


def test_grpc_inference_with_typed_parameters(kserve_calls, public):
    got = kserve_calls["grpc"]
    assert "error" not in got, got
    assert got["id"] == "kserve-grpc" and got["model_name"] == "fashion"
    expected = exact_json(public, 2)["ensemble"]
    assert np.argmax(got["outputs"]["ensemble"], axis=1).tolist() == np.argmax(expected, axis=1).tolist()
    fields = got["fields"]
    assert fields["approximate"] == "bool_param" and fields["seq"] == "int64_param"
    assert fields["resolution"] == "int64_param" and fields["exact_members"] == "string_param"
    assert "planes" not in fields  # float32's planes are None: left out, never the text "null"
    assert fields["elapsed_ms"] is None  # a double_param: KServe's copy of the proto has no such field
    assert got["parameters"]["approximate"] in (True, False) and got["parameters"]["seq"] >= 1
