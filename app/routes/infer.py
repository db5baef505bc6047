"""The OpenAPI description of `POST /v2/models/{group}[/versions/{v}]/infer`.

The route itself is served by app/hotpath.py, in front of the framework (its per-request layers
cost more than the rest of the request); these definitions are mounted only in the app that makes
the OpenAPI document (`app.main.openapi_document`), so `/docs` and schema-driven tools see it.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from protocol.v2 import HEADER_LENGTH, InferRequestModel, InferResponseModel

router = APIRouter()

_BINARY_BODY = {
    "schema": {"type": "string", "format": "binary"},
    "description": f"the binary tensor extension: a JSON request of {HEADER_LENGTH} bytes, then raw tensors",
}


_INFER_DOC: dict[str, object] = {
    "response_model": InferResponseModel,
    "openapi_extra": {
        "requestBody": {
            "content": {
                "application/json": {"schema": InferRequestModel.model_json_schema()},
                "application/octet-stream": _BINARY_BODY,
            },
            "required": True,
        },
        "parameters": [
            {
                "name": HEADER_LENGTH,
                "in": "header",
                "required": False,
                "schema": {"type": "integer", "minimum": 0},
                "description": "length of the JSON part of a binary-tensor request",
            }
        ],
    },
    "responses": {
        400: {"description": "bad request"},
        404: {"description": "unknown group or version"},
        429: {"description": "too many requests in flight"},
        503: {"description": "unavailable, or overloaded: the deadline cannot be met"},
        504: {"description": "deadline"},
    },
}


@router.post("/v2/models/{group}/infer", **_INFER_DOC)  # type: ignore[arg-type]
async def infer(group: str, request: Request) -> Response:
    """Answer with the request's final event (JSON, or binary tensors when asked), or follow it as
    server-sent events with `Accept: text/event-stream`."""
    raise NotImplementedError("served by app/hotpath.py")  # pragma: no cover


@router.post("/v2/models/{group}/versions/{version}/infer", **_INFER_DOC)  # type: ignore[arg-type]
async def infer_version(group: str, version: str, request: Request) -> Response:
    """The same, for the group's version (the bundle's `model_version`)."""
    raise NotImplementedError("served by app/hotpath.py")  # pragma: no cover
