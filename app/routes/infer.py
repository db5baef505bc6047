"""POST /v2/models/{group}/infer: a JSON answer, or the same call as a server-sent-event stream.

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
from app.deps import arrival_of, check_auth, check_group, state_of
from app.eventlog import EventLog, MemoryLog, follow, terminal
from app.lifecycle import CLIENT_GONE, Admitted, Owned
from app.sse import KEEPALIVE, STREAM_HEADERS, preamble
from app.state import Gateway
from app.validation import parse
from workers.protocol import InferRequestModel, InferResponseModel

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


async def sse_events(gw: Gateway, log: EventLog, after: int) -> AsyncIterator[bytes]:
    """The log as SSE bytes from `after`, with keep-alive comments while nothing happens."""
    yield preamble()
    async for event in follow(log, after, gw.settings.keepalive_s):
        yield KEEPALIVE if event is None else event.sse()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def json_answer(gw: Gateway, request: Request, owned: Owned) -> Response:
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
    headers = {"Retry-After": "1"} if event.status == 503 else None
    return Response(event.data, status_code=event.status, media_type="application/json", headers=headers)


@router.post(
    "/v2/models/{group}/infer",
    response_model=InferResponseModel,
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": InferRequestModel.model_json_schema()}},
            "required": True,
        }
    },
    responses={
        400: {"description": "bad request"},
        404: {"description": "unknown group"},
        429: {"description": "too many requests in flight"},
        503: {"description": "unavailable, or overloaded: the deadline cannot be met"},
        504: {"description": "deadline"},
    },
)
async def infer(group: str, request: Request) -> Response:
    # Plain calls instead of Depends: on the hot path FastAPI's dependency solving cost 10% of the
    # gateway's CPU (docs/serving.md).
    arrival = arrival_of(request)
    gw = state_of(request)
    check_auth(gw, request)  # before anything else: strangers learn nothing, not even group names
    check_group(gw, group)
    stream = "text/event-stream" in request.headers.get("accept", "")
    slot = admit_request(gw)
    stream_slot: Slot | None = None
    try:
        stream_slot = admit_stream(gw) if stream else None
        images, options, request_id = parse(await request.body(), gw.group, gw.settings, stream)
        check_deadline(gw, options.deadline_ms, options.members, arrival)
    except BaseException:
        slot.release()
        if stream_slot is not None:
            stream_slot.release()
        raise
    admitted = Admitted(images, options, arrival, request_id, "infer_stream" if stream else "infer", slot)
    owned = gw.lifecycle.start(MemoryLog(), admitted)
    if stream_slot is not None:
        return AdmittedStream(sse_events(gw, owned.log, 0), stream_slot, owned)
    return await json_answer(gw, request, owned)
