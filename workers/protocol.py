"""The worker's view of the OIP v2 codec: it lives in `protocol/v2.py` (DESIGN §2, the ground floor
shared by gateway and workers); these names are re-exported for the worker modules."""

from __future__ import annotations

from protocol.v2 import (
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    IMAGE_SHAPE,
    INPUT_NAME,
    OUTPUT_NAME,
    PIXELS,
    InferRequestModel,
    InferResponseModel,
    ProtocolError,
    TensorModel,
    encode_binary_request,
    encode_response,
    loads,
    output_tensor,
    parse_request,
    parse_response,
)

__all__ = [
    "BINARY_CONTENT_TYPE",
    "HEADER_LENGTH",
    "IMAGE_SHAPE",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PIXELS",
    "InferRequestModel",
    "InferResponseModel",
    "ProtocolError",
    "TensorModel",
    "encode_binary_request",
    "encode_response",
    "loads",
    "output_tensor",
    "parse_request",
    "parse_response",
]
