"""Open Inference Protocol v2 on the wire, shared by the gateway and the workers (numpy, no torch).

Requests carry one input tensor, FP32, shaped as the bundle's input spec says (protocol/spec.py:
[B, *shape], the same without its size-1 dimensions, or flat [B, size]), either as JSON `data` or
with the V2 binary tensor extension (a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw little-endian float32 data). Responses
carry one FP32 output of shape [B, C]. Parsing is hand-written over orjson and numpy because it is
the hot path; the pydantic models below document the same schema for OpenAPI.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field

from protocol.spec import InputSpec

OUTPUT_NAME = "probabilities"
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/vnd.coinserve.v2+binary"
NON_FINITE = "non-finite numbers (NaN, Infinity) are not allowed"
# A request's top-level fields: OIP's, plus `model_name`/`model_version`, which KServe's client
# sends in the body (they must name the model the route does: app/dataplane.py).
REQUEST_FIELDS = frozenset({"id", "model_name", "model_version", "parameters", "inputs", "outputs"})


class ProtocolError(ValueError):
    """A request or response that does not follow the protocol; the message names the field."""


class TensorModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int]
    datatype: str = Field(examples=["FP32"])
    data: list[float] | list[list[float]] | None = None
    parameters: dict[str, Any] | None = None


class InferRequestModel(BaseModel):
    """The V2 inference request (documented schema; the hot path parses by hand)."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorModel]
    outputs: list[dict[str, Any]] | None = None


class InferResponseModel(BaseModel):
    model_name: str
    id: str | None = None
    outputs: list[TensorModel]
    parameters: dict[str, Any] = {}


def loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(_not_json(body, exc)) from exc


def _not_json(body: bytes, exc: orjson.JSONDecodeError) -> str:
    """Why a body is not JSON, in the terms of what its sender most likely meant."""
    at = exc.doc[max(exc.pos - 1, 0) : exc.pos + 8] if isinstance(exc.doc, str) else ""
    if any(word in at for word in ("NaN", "Infinity")):  # what Python's json.dumps writes for them
        return f"{NON_FINITE}: JSON has no such numbers (line {exc.lineno}, column {exc.colno})"
    binary = f"a binary request (a JSON header, then raw tensor bytes) needs the {HEADER_LENGTH} header"
    try:
        body.decode()
    except UnicodeDecodeError:
        return f"the body is not UTF-8 JSON; {binary}"
    if str(exc).startswith("unexpected content after document"):
        return f"the body is not valid JSON ({exc}); {binary}"
    return f"body is not valid JSON: {exc}"


# Names the protocol or its common extensions define (Triton's docs/protocol/extension_*.md), and
# what the gateway does with them. Understood: `binary_data_output` (request), `binary_data`
# (output), `binary_data_size` (input). Knowingly ignored, accepted without effect: `priority`
# (one queue: every request is answered in arrival order), `timeout` (Triton's queue timeout in µs;
# our deadline is `deadline_ms`, counted from arrival and covering the whole request),
# `sequence_id`/`sequence_start`/`sequence_end` (the models are stateless, so a sequence changes
# nothing) and `triton_enable_empty_final_response` (gRPC streaming: our last response is always
# a non-empty one marked `triton_final_response`). Understood on an output: `classification` (the
# classification extension: the top N classes as BYTES strings "score:index:label"). Refused with
# a 400 that says so: shared memory (`shared_memory_region`, ...).
IGNORED_PARAMETERS = frozenset(
    {"priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "triton_enable_empty_final_response"}
)
_UNSUPPORTED = {
    "shared_memory_region": "shared memory is not supported: send the tensor in the request",
    "shared_memory_byte_size": "shared memory is not supported: send the tensor in the request",
    "shared_memory_offset": "shared memory is not supported: send the tensor in the request",
}


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool  # the binary tensor extension: raw little-endian bytes after the JSON header
    classification: int = 0  # > 0: the classification extension, the top N classes as strings


@dataclass(frozen=True)
class InferRequest:
    """A parsed request: inputs (B, *spec.shape) float32, our parameters, the id, the outputs asked
    for (None: every one) and whether outputs not asked for one by one go out binary."""

    images: np.ndarray
    parameters: dict[str, Any]
    request_id: str | None
    outputs: list[RequestedOutput] | None = None
    binary_output: bool = False
    model_name: str | None = None  # as the body names it (KServe's clients do); None: not named
    model_version: str | None = None


def _tensor_parameters(where: str, parameters: Any, known: tuple[str, ...]) -> dict[str, Any]:
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"{where}.parameters must be an object")
    for name in parameters:
        if name in _UNSUPPORTED:
            raise ProtocolError(f"{where}.parameters.{name}: {_UNSUPPORTED[name]}")
        if name not in known:
            raise ProtocolError(f"{where}.parameters: unknown parameter {name!r}; accepted: {list(known)}")
    return parameters


def _images(tensor: Any, binary: bytes | None, max_batch: int, spec: InputSpec) -> np.ndarray:
    if not isinstance(tensor, dict):
        raise ProtocolError("inputs[0] must be an object with name, shape, datatype and data")
    unknown = set(tensor) - {"name", "shape", "datatype", "data", "parameters"}
    if unknown:
        raise ProtocolError(f"inputs[0] has unknown fields: {sorted(unknown)}")
    if tensor.get("name") != spec.name:
        raise ProtocolError(f"inputs[0].name must be {spec.name!r} (the model's input), got {tensor.get('name')!r}")
    parameters = _tensor_parameters("inputs[0]", tensor.get("parameters"), ("binary_data_size",))
    if tensor.get("datatype") != spec.datatype:
        raise ProtocolError(f"inputs[0].datatype must be {spec.datatype!r}, got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"inputs[0].shape must be a list of non-negative integers, got {shape!r}")
    batch = shape[0]
    accepted = spec.accepted()
    if tuple(shape[1:]) not in accepted:
        shapes = " or ".join(str(["B", *s]).replace("'", "") for s in accepted)
        raise ProtocolError(f"inputs[0].shape must be {shapes}, got {shape}")
    if not 1 <= batch <= max_batch:
        raise ProtocolError(f"inputs[0].shape: batch size must be between 1 and {max_batch}, got {batch}")
    size = parameters.get("binary_data_size")
    if binary is not None or size is not None:
        values = _binary(binary, size, shape, batch * spec.size * 4, "data" in tensor)
    else:
        values = _numbers(tensor.get("data"), batch * spec.size, shape)
    _check_values(values, spec.range)
    return values.reshape(batch, *spec.shape)


def _check_values(values: np.ndarray, valid: tuple[float, float] | None) -> None:
    """Every value finite and, when the model states a (finite) range, inside it: one check without
    a range, two reductions without allocation with one (NaN fails both comparisons, an infinity lies
    outside any finite range); the first offender is looked for only on failure."""
    if valid is None:
        if np.isfinite(values).all():
            return
    elif valid[0] <= _smallest(values) and _largest(values) <= valid[1]:
        return
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(bad.argmax())
        raise ProtocolError(f"inputs[0].data: {NON_FINITE}; the first is {values[i]} at index {i}")
    assert valid is not None
    low, high = valid
    i = int(((values < low) | (values > high)).argmax())
    raise ProtocolError(
        f"inputs[0].data: values must lie in the model's input range [{low:g}, {high:g}]; "
        f"the first outside it is {float(values[i]):g} at index {i}"
    )


_smallest, _largest = np.minimum.reduce, np.maximum.reduce


def _binary(binary: bytes | None, size: Any, shape: list[int], needed: int, has_data: bool) -> np.ndarray:
    if binary is None:
        raise ProtocolError(f"inputs[0].parameters.binary_data_size needs the {HEADER_LENGTH} header")
    if has_data:
        raise ProtocolError("inputs[0] has both data and binary data; send one")
    if len(binary) != needed:
        raise ProtocolError(f"binary input holds {len(binary)} bytes; shape {shape} needs {needed}")
    if size is not None and (type(size) is not int or size != len(binary)):
        raise ProtocolError(f"inputs[0].parameters.binary_data_size is {size!r}; {len(binary)} bytes follow")
    return np.frombuffer(binary, dtype="<f4")


def _numbers(data: Any, count: int, shape: list[int]) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError("inputs[0].data must be a list of numbers")
    try:
        array = np.asarray(data)
    except ValueError as exc:
        raise ProtocolError(f"inputs[0].data is ragged: {exc}") from exc
    if array.dtype.kind not in "fi":
        raise ProtocolError("inputs[0].data must hold only numbers")
    if array.size != count:
        raise ProtocolError(f"inputs[0].data holds {array.size} values; shape {shape} needs {count}")
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused by the finiteness check
        return array.astype(np.float32, copy=False).reshape(-1)


def _requested(outputs: Any, output_names: Iterable[str] | None, binary_default: bool) -> list[RequestedOutput] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ProtocolError("outputs must be a list of objects with a name")
    names = None if output_names is None else list(output_names)
    requested: list[RequestedOutput] = []
    for i, output in enumerate(outputs):
        unknown = set(output) - {"name", "parameters"}
        if unknown:
            raise ProtocolError(f"outputs[{i}] has unknown fields: {sorted(unknown)}")
        name = output.get("name")
        if not isinstance(name, str):
            raise ProtocolError(f"outputs[{i}].name must be a string")
        if names is not None and name not in names:
            raise ProtocolError(f"outputs[{i}]: unknown output {name!r}; outputs are {names}")
        parameters = _tensor_parameters(f"outputs[{i}]", output.get("parameters"), ("binary_data", "classification"))
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(f"outputs[{i}].parameters.binary_data must be true or false")
        top = parameters.get("classification", 0)
        if "classification" in parameters and (type(top) is not int or top < 1):
            raise ProtocolError(f"outputs[{i}].parameters.classification must be a positive integer, got {top!r}")
        if any(r.name == name for r in requested):
            raise ProtocolError(f"outputs[{i}]: output {name!r} asked for twice")
        requested.append(RequestedOutput(name, binary, top))
    return requested


def parse_infer(
    body: bytes,
    header_length: int | None,
    max_batch: int,
    parameter_names: Iterable[str],
    spec: InputSpec,
    output_names: Iterable[str] | None = None,
) -> InferRequest:
    """The V2 request, JSON or with the binary tensor extension. Raises ProtocolError naming the field."""
    binary = None
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {header_length} does not fit a body of {len(body)} bytes")
        body, binary = body[:header_length], body[header_length:]
    request = loads(body)
    if not isinstance(request, dict):
        raise ProtocolError("the request body must be a JSON object")
    unknown = request.keys() - REQUEST_FIELDS
    if unknown:
        raise ProtocolError(f"unknown request fields: {sorted(unknown)}")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise ProtocolError("inputs must be a list holding exactly one tensor")
    images = _images(inputs[0], binary, max_batch, spec)
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("parameters must be an object")
    ours = set(parameter_names)
    unknown = set(parameters) - ours - IGNORED_PARAMETERS - {"binary_data_output"}
    if unknown:
        accepted = sorted(ours | {"binary_data_output"})
        raise ProtocolError(f"unknown parameters: {sorted(unknown)}; accepted: {accepted}")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ProtocolError("parameters.binary_data_output must be true or false")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("id must be a string")
    model_name, model_version = request.get("model_name"), request.get("model_version")
    if not isinstance(model_name, str | None) or not isinstance(model_version, str | None):
        raise ProtocolError("model_name and model_version must be strings")
    outputs = _requested(request.get("outputs"), output_names, binary_output)
    own = {k: v for k, v in parameters.items() if k in ours}
    return InferRequest(images, own, request_id, outputs, binary_output, model_name, model_version or None)


def parse_request(
    body: bytes, header_length: int | None, max_batch: int, parameter_names: Iterable[str], spec: InputSpec
) -> tuple[np.ndarray, dict[str, Any], str | None]:
    """→ (inputs (B, *spec.shape) float32, parameters, request id). Raises ProtocolError."""
    parsed = parse_infer(body, header_length, max_batch, parameter_names, spec)
    return parsed.images, parsed.parameters, parsed.request_id


def encode_binary_request(
    images: np.ndarray, parameters: dict[str, Any], name: str, request_id: str | None = None
) -> tuple[bytes, int]:
    """→ (body, header length) for the binary tensor extension; the gateway's fan-out format."""
    data = np.ascontiguousarray(images, dtype="<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": name,
                "shape": list(images.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(data)},
            }
        ],
        "parameters": parameters,
    }
    if request_id is not None:
        header["id"] = request_id
    head = orjson.dumps(header)
    return head + data, len(head)


def classification(values: np.ndarray, top: int, labels: Sequence[str] = ()) -> np.ndarray:
    """Triton's classification extension: per row the `top` highest classes, best first, as
    "score:index" or "score:index:label" strings (a BYTES tensor (B, min(top, C)))."""
    top = min(top, values.shape[1])
    order = np.argsort(-values, axis=1, kind="stable")[:, :top]
    return np.array(
        [[f"{values[b, i]:f}:{i}" + (f":{labels[i]}" if labels else "") for i in row] for b, row in enumerate(order)],
        dtype=object,
    ).reshape(len(values), top)


def datatype_of(values: np.ndarray) -> str:
    return "BYTES" if values.dtype == object else "FP32"


def tensor_bytes(values: np.ndarray) -> bytes:
    """A tensor's raw bytes: little-endian float32, or for BYTES each element's UTF-8 bytes after
    its 4-byte little-endian length (the binary tensor extension's and gRPC's layout)."""
    if values.dtype != object:
        return np.ascontiguousarray(values, dtype="<f4").tobytes()
    encoded = [str(v).encode() for v in values.ravel()]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def output_tensor(name: str, values: np.ndarray) -> dict[str, Any]:
    data = [str(v) for v in values.ravel()] if values.dtype == object else values.astype(np.float32).ravel().tolist()
    return {"name": name, "datatype": datatype_of(values), "shape": list(values.shape), "data": data}


def encode_outputs(header: dict[str, Any], outputs: list[tuple[str, np.ndarray, bool]]) -> tuple[bytes, int | None]:
    """A V2 response whose `outputs` are (name, values, binary): JSON tensors inline, binary ones
    after the JSON header (→ body, the header's length for `Inference-Header-Content-Length`, or
    None when every output is JSON). Values are float32 probabilities or BYTES strings."""
    tensors, raw = [], []
    for name, values, binary in outputs:
        if not binary:
            tensors.append(output_tensor(name, values))
            continue
        data = tensor_bytes(values)
        raw.append(data)
        shape = list(values.shape)
        tensors.append(
            {
                "name": name,
                "datatype": datatype_of(values),
                "shape": shape,
                "parameters": {"binary_data_size": len(data)},
            }
        )
    head = orjson.dumps({**header, "outputs": tensors})
    if not raw:
        return head, None
    return b"".join([head, *raw]), len(head)


def encode_response(
    model_name: str, probs: np.ndarray, parameters: dict[str, Any], request_id: str | None = None
) -> bytes:
    response: dict[str, Any] = {
        "model_name": model_name,
        "outputs": [output_tensor(OUTPUT_NAME, probs)],
        "parameters": parameters,
    }
    if request_id is not None:
        response["id"] = request_id
    return orjson.dumps(response)


def parse_response(body: bytes | Any, classes: int, batch: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A worker's response (bytes or parsed JSON) → (probs (B, C) float64, parameters). Refuses garbage."""
    response = loads(bytes(body)) if isinstance(body, bytes | bytearray | memoryview) else body
    if not isinstance(response, dict) or not isinstance(response.get("outputs"), list) or not response["outputs"]:
        raise ProtocolError("response has no outputs")
    tensor = response["outputs"][0]
    shape = tensor.get("shape") if isinstance(tensor, dict) else None
    if shape != [batch, classes]:
        raise ProtocolError(f"response output shape {shape} is not [{batch}, {classes}]")
    values = _numbers(tensor.get("data"), batch * classes, [batch, classes]).astype(np.float64)
    if not np.isfinite(values).all() or values.min(initial=0.0) < 0:
        raise ProtocolError("response output holds NaN, infinite or negative probabilities")
    parameters = response.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("response parameters must be an object")
    return values.reshape(batch, classes), parameters
