"""The shipped gRPC descriptor set is the shipped .proto compiled, and it speaks Triton's wire."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import orjson
import pytest

from protocol.grpc_service import DESCRIPTOR_SET, METHODS, PROTO, message, parameter_value, set_parameter, to_v2
from protocol.spec import InputSpec
from protocol.v2 import parse_infer


def test_the_descriptor_set_is_the_proto_compiled(tmp_path):
    pytest.importorskip("grpc_tools")
    out = tmp_path / "fresh.desc"
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO.parent}",
        f"--descriptor_set_out={out}",
        str(PROTO),
    ]
    subprocess.run(command, check=True)
    assert out.read_bytes() == DESCRIPTOR_SET.read_bytes(), "regenerate protocol/grpc_service.desc (see its .proto)"


def test_every_method_has_its_messages():
    for request, response, _ in METHODS.values():
        assert message(request).DESCRIPTOR.full_name == f"inference.{request}"
        assert message(response).DESCRIPTOR.full_name == f"inference.{response}"


@pytest.mark.parametrize("value", [True, 3, 2.5, "x", ["a", "b"], None])
def test_parameters_round_trip_or_become_json_text(value):
    parameter = message("InferParameter")()
    set_parameter(parameter, value)
    got = parameter_value(parameter)
    assert got == value if isinstance(value, bool | int | float | str) else got == orjson.dumps(value).decode()


def test_a_grpc_request_becomes_the_binary_rest_request():
    request = message("ModelInferRequest")(model_name="m", id="rid")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 784])
    x = np.random.default_rng(0).random((2, 784), dtype=np.float32)
    request.raw_input_contents.append(x.tobytes())
    request.parameters["members"].string_param = "a, b"
    request.parameters["deadline_ms"].int64_param = 50
    request.outputs.add(name="ensemble")
    body, length = to_v2(request)
    parsed = parse_infer(
        body, length, 64, ("members", "deadline_ms"), InputSpec("input", (1, 28, 28)), ["a", "b", "ensemble"]
    )
    assert np.array_equal(parsed.images.reshape(2, 784), x) and parsed.request_id == "rid"
    assert parsed.parameters == {"members": ["a", "b"], "deadline_ms": 50}
    assert [o.name for o in parsed.outputs or ()] == ["ensemble"]
