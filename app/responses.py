"""The V2 response, rendered here and nowhere else (DESIGN §2): an update as the default JSON body
every log stores, and a request's answer as its client asked for it (DESIGN §3): the outputs it
named, in its order, as JSON or with the binary tensor extension. Pure functions, no I/O.

The log holds each event's default rendering (every output, JSON). A request that asks for the
default gets those bytes as they are; any other rendering starts from the event's `Update` when
the log is in this process, or from its JSON when the log came from a shared store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from app.eventlog import Event
from app.group import Group
from app.updates import Update
from protocol.v2 import HEADER_LENGTH, InferRequest, classification, encode_outputs, output_tensor

JSON = "application/json"
BINARY = "application/octet-stream"


def response_parameters(update: Update, group: Group) -> dict[str, Any]:
    exact = update.exact_members(group.resolutions - 1)
    parameters = {
        "seq": update.seq,
        "resolution": update.resolution,
        "planes": group.planes[update.resolution] if update.answers else None,
        "exact_members": exact,
        "decoded_members": update.decoded_members(),
        "approximate": len(exact) != len(update.members),
        "elapsed_ms": update.elapsed_ms,
    }
    if update.coarse_slower:  # parameters.coarse got a resolution its replica skips as no cheaper (issue 31)
        parameters["coarse_slower"] = True
    return parameters


def response_body(update: Update, group: Group, request_id: str | None) -> dict[str, Any]:
    """The V2 response of an update: one output per member plus `ensemble` (or `{"error": ...}`)."""
    if update.event == "error":
        return {"error": update.error}
    outputs = [output_tensor(m, update.answers[m].probs) for m in update.members]
    outputs.append(output_tensor("ensemble", update.ensemble()))
    body: dict[str, Any] = {
        "model_name": group.name,
        "model_version": group.version,
        "outputs": outputs,
        "parameters": response_parameters(update, group),
    }
    if request_id is not None:
        body["id"] = request_id
    return body


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def is_default(request: InferRequest) -> bool:
    return request.outputs is None and not request.binary_output


def parts(event: Event, group: Group, request_id: str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A non-error event as (response header without outputs, output name → values (B, C) float32)."""
    update = event.update
    if update is None:
        body = orjson.loads(event.data)
        tensors = {o["name"]: np.asarray(o["data"], dtype=np.float32).reshape(o["shape"]) for o in body.pop("outputs")}
        return body, tensors
    tensors = {m: np.asarray(update.answers[m].probs, dtype=np.float32) for m in update.members}
    tensors["ensemble"] = np.asarray(update.ensemble(), dtype=np.float32)
    header: dict[str, Any] = {
        "model_name": group.name,
        "model_version": group.version,
        "parameters": response_parameters(update, group),
    }
    if request_id is not None:
        header["id"] = request_id
    return header, tensors


def chosen(tensors: dict[str, np.ndarray], request: InferRequest, group: Group) -> list[tuple[str, np.ndarray, bool]]:
    """The outputs the request asked for, in its order, as (name, values, binary); an output asked
    for with `classification: N` becomes its top N classes as "score:index:label" strings."""
    if request.outputs is None:
        return [(name, values, request.binary_output) for name, values in tensors.items()]
    return [
        (
            o.name,
            classification(tensors[o.name], o.classification, group.spec.labels)
            if o.classification
            else tensors[o.name],
            o.binary,
        )
        for o in request.outputs
        if o.name in tensors
    ]


def render(event: Event, request: InferRequest, group: Group) -> tuple[bytes, str, dict[str, str]]:
    """→ (body, content type, extra headers) of one event for this request."""
    if event.name == "error" or is_default(request):
        return event.data, JSON, {}
    header, tensors = parts(event, group, request.request_id)
    body, length = encode_outputs(header, chosen(tensors, request, group))
    if length is None:
        return body, JSON, {}
    return body, BINARY, {HEADER_LENGTH: str(length)}
