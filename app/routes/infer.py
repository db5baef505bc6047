"""POST /v2/models/{group}/infer: a JSON answer, or the same call as a server-sent-event stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import anyio
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from app.deps import check_auth, check_group, state_of
from app.errors import TooManyRequestsError
from app.fanout import Update
from app.sse import KEEPALIVE, STREAM_HEADERS, format_event, preamble, response_body
from app.state import Gateway
from app.validation import parse
from workers.protocol import InferRequestModel, InferResponseModel

router = APIRouter()


class Admission:
    """A place within the gateway's limits, taken with no await between the check and the count (so
    a burst cannot slip past the limit while bodies are read) and given back exactly once."""

    def __init__(self, gw: Gateway, stream: bool) -> None:
        if gw.inflight >= gw.settings.max_concurrent_requests:
            raise TooManyRequestsError("too many requests in flight; retry shortly", headers={"Retry-After": "1"})
        if stream and gw.open_streams >= gw.settings.max_open_streams:
            raise TooManyRequestsError("too many open event streams; retry shortly", headers={"Retry-After": "1"})
        self.gw, self.stream, self.held = gw, stream, True
        gw.inflight += 1
        gw.metrics.inflight.inc()
        if stream:
            gw.open_streams += 1
            gw.metrics.streams.inc()

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gw.inflight -= 1
            self.gw.metrics.inflight.dec()
            if self.stream:
                self.gw.open_streams -= 1
                self.gw.metrics.streams.dec()


def admit(gw: Gateway, stream: bool) -> Admission:
    """Back-pressure: refuse beyond the configured limits (429 + Retry-After), never queue without bound."""
    return Admission(gw, stream)


class AdmittedStream(StreamingResponse):
    """A streaming response that gives its admission back when it ends, however it ends (also when
    the client left before the first byte, so the body generator never started)."""

    def __init__(self, content: AsyncIterator[bytes], admission: Admission) -> None:
        super().__init__(content, media_type="text/event-stream", headers=STREAM_HEADERS)
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.admission.release()


def record(gw: Gateway, endpoint: str, update: Update, first_complete_ms: float | None) -> None:
    """Metrics of a finished request: outcome, times, decoded members, approximate finals."""
    m = gw.metrics
    m.requests.labels(endpoint, update.event if update.event != "error" else f"error_{update.status}").inc()
    if update.event != "final":
        return
    if first_complete_ms is not None:
        m.time_to_coarse.observe(first_complete_ms / 1000)
    m.time_to_final.observe(update.elapsed_ms / 1000)
    decoded = update.decoded_members()
    for member in decoded:
        m.decoded.labels(member).inc()
    low = update.resolution < gw.group.resolutions - 1
    if decoded or low:
        m.approximate.labels("low_resolution" if low else "decoded").inc()


async def with_keepalive(updates: AsyncIterator[Update], interval_s: float) -> AsyncIterator[Update | None]:
    """Pass updates through, yielding None whenever `interval_s` passes without one."""
    iterator = updates.__aiter__()
    pending: asyncio.Task[Update] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield None
                continue
            try:
                update = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield update
    finally:
        # A client that hangs up cancels the request's task, and anyio then cancels every await in
        # it again: clean up under a shield, or the fan-out's replica calls live on until GC.
        with anyio.CancelScope(shield=True):
            if pending is not None:  # the client left: stop the fan-out and collect what it raised
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            await iterator.aclose()  # type: ignore[attr-defined]


async def sse_events(
    gw: Gateway, updates: AsyncIterator[Update], request_id: str | None, endpoint: str
) -> AsyncIterator[bytes]:
    first: float | None = None
    last: Update | None = None
    watched = with_keepalive(updates, gw.settings.keepalive_s)
    try:
        yield preamble()
        async for update in watched:
            if update is None:
                yield KEEPALIVE
                continue
            last = update
            first = update.elapsed_ms if first is None and update.event != "error" else first
            yield format_event(update, gw.group, request_id)
    finally:
        with anyio.CancelScope(shield=True):  # see with_keepalive
            await watched.aclose()  # type: ignore[attr-defined]
        if last is not None and last.event in ("final", "error"):
            record(gw, endpoint, last, first)
        else:
            gw.metrics.requests.labels(endpoint, "client_gone").inc()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def json_answer(
    gw: Gateway, request: Request, updates: AsyncIterator[Update], request_id: str | None
) -> Response:
    """Consume the updates to the final one; a client that hangs up cancels the whole request."""

    async def last_update() -> tuple[Update, float | None]:
        first: float | None = None
        async for update in updates:
            if update.event in ("final", "error"):
                return update, first
            first = update.elapsed_ms if first is None else first
        raise RuntimeError("fan-out ended without a final or error")

    answer = asyncio.ensure_future(last_update())
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not answer.done():
            answer.cancel()
            gw.metrics.requests.labels("infer", "client_gone").inc()
        with anyio.CancelScope(shield=True):  # see sse_events
            await asyncio.gather(answer, watcher, return_exceptions=True)
            await updates.aclose()  # type: ignore[attr-defined]
    update, first = answer.result()
    record(gw, "infer", update, first)
    body = orjson.dumps(response_body(update, gw.group, request_id))
    headers = {"Retry-After": "1"} if update.status == 503 else None
    return Response(body, status_code=update.status, media_type="application/json", headers=headers)


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
        503: {"description": "unavailable"},
        504: {"description": "deadline"},
    },
)
async def infer(group: str, request: Request) -> Response:
    # Plain calls instead of Depends: on the hot path FastAPI's dependency solving cost 10% of the
    # gateway's CPU (docs/serving.md).
    started = time.perf_counter()
    gw = state_of(request)
    check_auth(gw, request)  # before anything else: strangers learn nothing, not even group names
    check_group(gw, group)
    stream = "text/event-stream" in request.headers.get("accept", "")
    admission = admit(gw, stream)
    try:
        images, options, request_id = parse(await request.body(), gw.group, gw.settings, stream)
    except BaseException:
        admission.release()
        raise
    updates = gw.fanout.run(images, options, started, request_id)
    if stream:
        return AdmittedStream(sse_events(gw, updates, request_id, "infer_stream"), admission)
    try:
        return await json_answer(gw, request, updates, request_id)
    finally:
        admission.release()
