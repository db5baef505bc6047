"""The shipped gRPC descriptor set is the shipped .proto compiled, and it speaks Triton's wire."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import orjson
import pytest

from protocol.grpc_service import (
    DESCRIPTOR_SET,
    METHODS,
    PROTO,
    message,
    parameter_value,
    set_parameter,
    set_parameters,
    to_v2,
)
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


@pytest.mark.parametrize("value", [True, 3, 2.5, "x", ["a", "b"]])
def test_parameters_round_trip_or_become_json_text(value):
    parameter = message("InferParameter")()
    set_parameter(parameter, value)
    got = parameter_value(parameter)
    assert got == value if isinstance(value, bool | int | float | str) else got == orjson.dumps(value).decode()


def test_response_parameters_are_typed_and_absent_ones_left_out():
    """Numbers and booleans travel in their own fields, not as JSON text; None (float32's `planes`) is absent."""
    response = message("ModelInferResponse")()
    values = {"seq": 2, "planes": None, "approximate": False, "elapsed_ms": 3.5, "exact_members": ["m-0"]}
    set_parameters(response.parameters, values)
    fields = {name: p.WhichOneof("parameter_choice") for name, p in response.parameters.items()}
    assert fields == {
        "seq": "int64_param",
        "approximate": "bool_param",
        "elapsed_ms": "double_param",
        "exact_members": "string_param",
    }
    assert response.parameters["elapsed_ms"].double_param == 3.5 and not response.parameters["approximate"].bool_param


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


def test_every_kept_field_has_tritons_number_and_type():
    """Our cut of Triton's messages (issue 28 added ModelConfig, statistics and repository ones) is
    wire-compatible: each kept field, nested message and enum value is Triton's own."""
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import descriptor_pool
    from tritonclient.grpc import service_pb2  # noqa: F401  (registers Triton's messages)

    theirs = descriptor_pool.Default()
    seen: set[str] = set()

    def check(ours, triton):
        if ours.full_name in seen:
            return
        seen.add(ours.full_name)
        for f in ours.fields:
            t = triton.fields_by_name[f.name]
            assert (t.number, t.type, t.is_repeated) == (f.number, f.type, f.is_repeated), f.full_name
            if f.message_type is not None:  # ModelConfig's parts, statistics' durations, map entries
                check(f.message_type, t.message_type)
        for nested in ours.nested_types:
            check(nested, triton.nested_types_by_name[nested.name])
        for enum in ours.enum_types:
            assert [(v.name, v.number) for v in enum.values] == [
                (v.name, v.number) for v in triton.enum_types_by_name[enum.name].values
            ]

    service = message("ModelConfig").DESCRIPTOR.file.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        assert method.name in METHODS
        check(method.input_type, theirs.FindMessageTypeByName(method.input_type.full_name))
        check(method.output_type, theirs.FindMessageTypeByName(method.output_type.full_name))
    assert "inference.ModelInput" in seen and "inference.StatisticDuration" in seen
