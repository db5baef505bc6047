"""POST /v1/requests and GET /v1/requests/{id}/events: a detached request whose event stream a
browser `EventSource` can follow, and resume with `Last-Event-ID` within the retention window."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.deps import AuthorisedDep, GatewayDep
from app.errors import BadRequestError, NotFoundError, TooManyRequestsError
from app.fanout import Update
from app.routes.infer import AdmittedStream, admit, record
from app.sse import KEEPALIVE, format_event, preamble
from app.state import Gateway
from app.streams import RetainedStream
from app.validation import parse
from workers.protocol import InferRequestModel

router = APIRouter()


async def _produce(gw: Gateway, stream: RetainedStream, updates: AsyncIterator[Update], request_id: str) -> None:
    first: float | None = None
    last: Update | None = None
    try:
        async for update in updates:
            last = update
            first = update.elapsed_ms if first is None else first
            stream.append(format_event(update, gw.group, request_id), last=update.event in ("final", "error"))
    finally:
        if last is not None:
            record(gw, "requests", last, first)
        if not stream.done:  # cancelled at shutdown: the stream still ends with exactly one error
            cancelled = Update("error", len(stream.events) + 1, 0.0, error="the gateway shut down", status=503)
            stream.append(format_event(cancelled, gw.group, request_id), last=True)


@router.post(
    "/v1/requests",
    status_code=202,
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": InferRequestModel.model_json_schema()}},
            "required": True,
        }
    },
)
async def create(request: Request, gw: AuthorisedDep) -> JSONResponse:
    started = time.perf_counter()
    admission = admit(gw, stream=False)  # held while the body is read; the run is bounded by retention_max
    try:
        images, options, given_id = parse(await request.body(), gw.group, gw.settings, stream=True)
    finally:
        admission.release()
    request_id = given_id or uuid.uuid4().hex
    if gw.registry.get(request_id) is not None:
        raise BadRequestError(f"id {request_id!r} is already in use; leave id out to get a fresh one")
    stream = gw.registry.create(request_id)
    if stream is None:
        raise TooManyRequestsError(
            "too many retained requests still running; retry shortly", headers={"Retry-After": "1"}
        )
    updates = gw.fanout.run(images, options, started, request_id)
    stream.task = asyncio.create_task(_produce(gw, stream, updates, request_id), name=f"request-{request_id}")
    url = f"/v1/requests/{request_id}/events"
    return JSONResponse({"id": request_id, "events_url": url}, status_code=202, headers={"Location": url})


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id") or "0"
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise BadRequestError(f"Last-Event-ID must be a non-negative integer, got {raw!r}")
    return int(raw)


@router.get("/v1/requests/{request_id}/events")
async def events(request_id: str, request: Request, gw: GatewayDep, _auth: AuthorisedDep) -> StreamingResponse:
    stream = gw.registry.get(request_id)
    if stream is None:
        raise NotFoundError(
            f"no request {request_id!r} (unknown, or older than the {gw.settings.retention_s:g} s retention)"
        )
    after = _last_event_id(request)
    admission = admit(gw, stream=True)

    async def body() -> AsyncIterator[bytes]:
        yield preamble()
        async for event in stream.follow(after, gw.settings.keepalive_s):
            yield KEEPALIVE if event is None else event

    return AdmittedStream(body(), admission)
