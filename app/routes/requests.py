"""POST /v1/requests and GET /v1/requests/{id}/events: a detached request whose event log a browser
`EventSource` can follow, and resume with `Last-Event-ID` within the retention window.

The request is owned by its run (app/lifecycle.py), not by any connection: followers come and go,
the request holds its admission slot until its terminal event. Once a retained log is complete, a
reconnect at or past its last id gets 204, which tells a browser `EventSource` to stop retrying.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from app import sse
from app.admission import Slot
from app.deps import AuthorisedDep, GatewayDep, arrival_of
from app.errors import BadRequestError, NotFoundError, UnavailableError
from app.redis_store import StoreUnavailableError
from protocol.v2 import InferRequestModel

router = APIRouter()


class SlotStream(StreamingResponse):
    """An event stream that gives its stream slot back when it ends, however it ends (also when the
    client left before the first byte, so the body generator never started)."""

    def __init__(self, content: AsyncIterator[bytes], slot: Slot) -> None:
        super().__init__(content, media_type=sse.MEDIA_TYPE, headers=sse.STREAM_HEADERS)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


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
    arrival = arrival_of(request)
    request_id = await gw.dataplane.start_detached(await request.body(), arrival)
    url = f"/v1/requests/{request_id}/events"
    return JSONResponse({"id": request_id, "events_url": url}, status_code=202, headers={"Location": url})


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id") or "0"
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise BadRequestError(f"Last-Event-ID must be a non-negative integer, got {raw!r}")
    return int(raw)


@router.get("/v1/requests/{request_id}/events", responses={204: {"description": "the stream is complete"}})
async def events(request_id: str, request: Request, gw: GatewayDep, _auth: AuthorisedDep) -> Response:
    try:
        log = await gw.store.get(request_id)
    except StoreUnavailableError as exc:
        raise UnavailableError(f"{exc}; retry shortly", headers={"Retry-After": "1"}) from None
    if log is None:
        raise NotFoundError(
            f"no request {request_id!r} (unknown, or older than the {gw.settings.retention_s:g} s retention)"
        )
    after = _last_event_id(request)
    if log.done and after >= log.last_seq:
        return Response(status_code=204)
    if after > log.last_seq:  # no client has seen an id the log has not written yet
        raise BadRequestError(f"Last-Event-ID {after} is past the stream's last event ({log.last_seq})")
    slot = gw.admission.stream()
    return SlotStream(sse.events(log, after, gw.settings.keepalive_s, gw.group), slot)
