"""The OIP v2 gRPC messages (Triton's `inference.GRPCInferenceService`), built from the shipped
descriptor set `grpc_service.desc` (compiled from `grpc_service.proto`; see its header).

The message classes live in a private descriptor pool, not protobuf's default one, so this module
can share a process with Triton's own client (whose generated code registers the same names).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "inference.GRPCInferenceService"
DESCRIPTOR_SET = Path(__file__).with_name("grpc_service.desc")
PROTO = Path(__file__).with_name("grpc_service.proto")

# method → (request message, response message, streaming both ways)
METHODS = {
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse", False),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse", False),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse", False),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse", False),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse", False),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse", False),
    "ModelStreamInfer": ("ModelInferRequest", "ModelStreamInferResponse", True),
    "ModelConfig": ("ModelConfigRequest", "ModelConfigResponse", False),
    "ModelStatistics": ("ModelStatisticsRequest", "ModelStatisticsResponse", False),
    "RepositoryIndex": ("RepositoryIndexRequest", "RepositoryIndexResponse", False),
    "RepositoryModelLoad": ("RepositoryModelLoadRequest", "RepositoryModelLoadResponse", False),
    "RepositoryModelUnload": ("RepositoryModelUnloadRequest", "RepositoryModelUnloadResponse", False),
}


@cache
def _pool() -> descriptor_pool.DescriptorPool:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


@cache
def message(name: str) -> Any:
    """The message class `inference.<name>`, e.g. message("ModelInferRequest")."""
    return message_factory.GetMessageClass(_pool().FindMessageTypeByName(f"inference.{name}"))


def parameter_value(parameter: Any) -> bool | int | float | str | None:
    """The value of an `InferParameter`, whichever of its oneof fields is set."""
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def set_parameters(parameters: Any, values: dict[str, Any]) -> None:
    """Fill a protobuf parameter map from JSON values, each typed as the protocol allows
    (`set_parameter`); a None value is left out, as an absent parameter is."""
    for name, value in values.items():
        if value is not None:
            set_parameter(parameters[name], value)


def set_parameter(parameter: Any, value: bool | int | float | str | list[Any]) -> None:
    """Fill an `InferParameter` from a Python value: booleans as `bool_param`, integers as
    `int64_param`, other numbers as `double_param` (a field KServe's copy of the proto lacks: its
    client drops them), strings as `string_param`; lists, which no field can hold, as their JSON text."""
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    elif isinstance(value, str):
        parameter.string_param = value
    else:
        parameter.string_param = orjson.dumps(value).decode()


def _values(parameters: Any, lists: tuple[str, ...]) -> dict[str, Any]:
    """A protobuf parameter map as JSON values; the names in `lists` may come as JSON text or
    comma-separated (gRPC parameters cannot hold lists)."""
    out: dict[str, Any] = {}
    for name, parameter in parameters.items():
        value: Any = parameter_value(parameter)
        if name in lists and isinstance(value, str):
            text = value.strip()
            value = orjson.loads(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
        out[name] = value
    return out


def to_v2(request: Any, lists: tuple[str, ...] = ("members",)) -> tuple[bytes, int]:
    """A `ModelInferRequest` as the REST request with the binary tensor extension (→ body, header
    length), so that gRPC and REST requests go through one parser (protocol/v2.py `parse_infer`).
    Raises ValueError for what cannot be expressed (e.g. two tensors' worth of raw contents)."""
    inputs, raw = [], []
    for i, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype}
        params = _values(tensor.parameters, ())
        if i < len(request.raw_input_contents):
            data = request.raw_input_contents[i]
        elif tensor.HasField("contents"):
            data = np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()
        else:
            data = b""
        params["binary_data_size"] = len(data)
        entry["parameters"] = params
        inputs.append(entry)
        raw.append(data)
    if len(request.raw_input_contents) > len(request.inputs):
        raise ValueError("raw_input_contents holds more tensors than inputs")
    header: dict[str, Any] = {"inputs": inputs}
    if request.id:
        header["id"] = request.id
    if request.parameters:
        header["parameters"] = _values(request.parameters, lists)
    if request.outputs:
        header["outputs"] = [
            {"name": o.name, **({"parameters": _values(o.parameters, ())} if o.parameters else {})}
            for o in request.outputs
        ]
    head = orjson.dumps(header)
    return b"".join([head, *raw]), len(head)
