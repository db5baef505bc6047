"""Open Inference Protocol v2 on the wire, shared by the gateway and the workers (numpy, no torch).

Requests carry one input tensor of images, shape [B, 1, 28, 28], [B, 28, 28] or [B, 784], FP32,
either as JSON `data` or with the V2 binary tensor extension (a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw little-endian float32 data). Responses
carry one FP32 output of shape [B, C]. Parsing is hand-written over orjson and numpy because it is
the hot path; the pydantic models below document the same schema for OpenAPI.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/vnd.coinserve.v2+binary"
IMAGE_SHAPE = (1, 28, 28)
PIXELS = 784
_ACCEPTED_SHAPES = "[B, 1, 28, 28], [B, 28, 28] or [B, 784]"


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
        raise ProtocolError(f"body is not valid JSON: {exc}") from exc


def _images(tensor: Any, binary: bytes | None, max_batch: int) -> np.ndarray:
    if not isinstance(tensor, dict):
        raise ProtocolError("inputs[0] must be an object with name, shape, datatype and data")
    unknown = set(tensor) - {"name", "shape", "datatype", "data", "parameters"}
    if unknown:
        raise ProtocolError(f"inputs[0] has unknown fields: {sorted(unknown)}")
    if tensor.get("datatype") != "FP32":
        raise ProtocolError(f"inputs[0].datatype must be 'FP32', got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"inputs[0].shape must be a list of non-negative integers, got {shape!r}")
    batch = shape[0]
    if tuple(shape[1:]) not in ((1, 28, 28), (28, 28), (PIXELS,)):
        raise ProtocolError(f"inputs[0].shape must be {_ACCEPTED_SHAPES}, got {shape}")
    if not 1 <= batch <= max_batch:
        raise ProtocolError(f"inputs[0].shape: batch size must be between 1 and {max_batch}, got {batch}")
    if binary is not None:
        if len(binary) != batch * PIXELS * 4:
            raise ProtocolError(f"binary input holds {len(binary)} bytes; shape {shape} needs {batch * PIXELS * 4}")
        values = np.frombuffer(binary, dtype="<f4")
    else:
        values = _numbers(tensor.get("data"), batch * PIXELS, shape)
    if not np.isfinite(values).all():
        raise ProtocolError("inputs[0].data must be finite (no NaN or Infinity)")
    return values.reshape(batch, *IMAGE_SHAPE)


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


def parse_request(
    body: bytes, header_length: int | None, max_batch: int, parameter_names: Iterable[str]
) -> tuple[np.ndarray, dict[str, Any], str | None]:
    """→ (images (B, 1, 28, 28) float32, parameters, request id). Raises ProtocolError."""
    binary = None
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {header_length} does not fit a body of {len(body)} bytes")
        body, binary = body[:header_length], body[header_length:]
    request = loads(body)
    if not isinstance(request, dict):
        raise ProtocolError("the request body must be a JSON object")
    unknown = set(request) - {"id", "parameters", "inputs", "outputs"}
    if unknown:
        raise ProtocolError(f"unknown request fields: {sorted(unknown)}")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise ProtocolError("inputs must be a list holding exactly one tensor")
    images = _images(inputs[0], binary, max_batch)
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("parameters must be an object")
    unknown = set(parameters) - set(parameter_names)
    if unknown:
        raise ProtocolError(f"unknown parameters: {sorted(unknown)}; accepted: {sorted(parameter_names)}")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("id must be a string")
    return images, parameters, request_id


def encode_binary_request(
    images: np.ndarray, parameters: dict[str, Any], request_id: str | None = None
) -> tuple[bytes, int]:
    """→ (body, header length) for the binary tensor extension; the gateway's fan-out format."""
    data = np.ascontiguousarray(images, dtype="<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": INPUT_NAME,
                "shape": [len(images), *IMAGE_SHAPE],
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


def output_tensor(name: str, values: np.ndarray) -> dict[str, Any]:
    return {
        "name": name,
        "datatype": "FP32",
        "shape": list(values.shape),
        "data": values.astype(np.float32).ravel().tolist(),
    }


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
