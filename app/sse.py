"""Server-sent events as pure functions: an Update becomes `id:`/`event:`/`data:` bytes (no I/O)."""

from __future__ import annotations

from typing import Any

import orjson

from app.eventlog import Event
from app.fanout import Update, response_parameters
from app.group import Group
from protocol.v2 import output_tensor

KEEPALIVE = b": keep-alive\n\n"
RETRY_MS = 2000


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


def format_event(update: Update, group: Group, request_id: str | None) -> bytes:
    data = orjson.dumps(response_body(update, group, request_id))
    return Event(update.seq, update.event, update.status, data).sse()


def preamble() -> bytes:
    """Sent first on every stream: the browser's reconnection delay."""
    return b"retry: %d\n\n" % RETRY_MS


STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
