"""POST /v2/models/{group}[/versions/{v}]/infer: a JSON (or binary-tensor) answer, or the same call as
a server-sent-event stream.

Both read the request's event log (app/lifecycle.py owns the request): JSON waits for the terminal
event; SSE follows the log. A client that hangs up cancels its request; the request still ends its
log with one terminal event and gives back its admission slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from app.admission import Slot, admit_request, admit_stream, check_deadline
from app.deps import arrival_of, check_auth, check_group, check_version, state_of
from app.errors import BadRequestError
from app.eventlog import Event, EventLog, MemoryLog, follow, terminal
from app.lifecycle import CLIENT_GONE, Admitted, Owned
from app.responses import is_default, render
from app.sse import KEEPALIVE, STREAM_HEADERS, preamble
from app.state import Gateway
from app.validation import header_length, parse_request
from protocol.v2 import HEADER_LENGTH, InferRequest, InferRequestModel, InferResponseModel

router = APIRouter()


class AdmittedStream(StreamingResponse):
    """A streaming response that gives its stream slot back when it ends, however it ends (also when
    the client left before the first byte, so the body generator never started)."""

    def __init__(self, content: AsyncIterator[bytes], slot: Slot, owned: Owned | None = None) -> None:
        super().__init__(content, media_type="text/event-stream", headers=STREAM_HEADERS)
        self.slot, self.owned = slot, owned

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()
            if self.owned is not None:  # the client of a direct stream left: stop its request
                self.owned.cancel(CLIENT_GONE)


async def sse_events(
    gw: Gateway, log: EventLog, after: int, request: InferRequest | None = None
) -> AsyncIterator[bytes]:
    """The log as SSE bytes from `after`, with keep-alive comments while nothing happens; only the
    outputs `request` asked for, when it named some."""
    yield preamble()
    async for event in follow(log, after, gw.settings.keepalive_s):
        if event is None:
            yield KEEPALIVE
        elif request is None or is_default(request):
            yield event.sse()
        else:
            data, _, _ = render(event, request, gw.group)
            yield Event(event.seq, event.name, event.status, data).sse()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def json_answer(gw: Gateway, request: Request, owned: Owned, parsed: InferRequest) -> Response:
    """The terminal event as the JSON answer; a client that hangs up cancels its request."""
    answer = asyncio.ensure_future(terminal(owned.log))
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not answer.done():
            owned.cancel(CLIENT_GONE)
        with anyio.CancelScope(shield=True):  # a cancelled handler still collects what it started
            await asyncio.gather(watcher, return_exceptions=True)
            if owned.task is not None:
                await asyncio.gather(owned.task, return_exceptions=True)
    event = await terminal(owned.log)  # written by now, however the request ended
    body, media_type, headers = render(event, parsed, gw.group)
    if event.status == 503:
        headers["Retry-After"] = "1"
    return Response(body, status_code=event.status, media_type=media_type, headers=headers)


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
    return await _infer(group, None, request)


@router.post("/v2/models/{group}/versions/{version}/infer", **_INFER_DOC)  # type: ignore[arg-type]
async def infer_version(group: str, version: str, request: Request) -> Response:
    return await _infer(group, version, request)


async def _infer(group: str, version: str | None, request: Request) -> Response:
    # Plain calls instead of Depends: on the hot path FastAPI's dependency solving cost 10% of the
    # gateway's CPU (docs/serving.md).
    arrival = arrival_of(request)
    gw = state_of(request)
    check_auth(gw, request)  # before anything else: strangers learn nothing, not even group names
    check_group(gw, group)
    check_version(gw, version)
    stream = "text/event-stream" in request.headers.get("accept", "")
    slot = admit_request(gw)
    stream_slot: Slot | None = None
    try:
        stream_slot = admit_stream(gw) if stream else None
        length = header_length(request.headers.get(HEADER_LENGTH))
        parsed, options = parse_request(await request.body(), length, gw.group, gw.settings, stream)
        if stream and (parsed.binary_output or any(o.binary for o in parsed.outputs or ())):
            raise BadRequestError("binary outputs cannot travel in an event stream; ask for JSON outputs")
        check_deadline(gw, options.deadline_ms, options.members, arrival)
    except BaseException:
        slot.release()
        if stream_slot is not None:
            stream_slot.release()
        raise
    admitted = Admitted(parsed.images, options, arrival, parsed.request_id, "infer_stream" if stream else "infer", slot)
    owned = gw.lifecycle.start(MemoryLog(), admitted)
    if stream_slot is not None:
        return AdmittedStream(sse_events(gw, owned.log, 0, parsed), stream_slot, owned)
    return await json_answer(gw, request, owned, parsed)
