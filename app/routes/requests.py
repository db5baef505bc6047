"""POST /v1/requests, GET /v1/requests/{id}/events and GET /v1/requests/{id}: a detached request
whose event log a browser `EventSource` can follow, and resume with `Last-Event-ID` within the
retention window, or a client can poll.

Its id is the body's `id`, else the `X-Request-ID` header, else a fresh one, and the response's
`X-Request-ID` is that id (both given must agree: 400). On a gateway with a bearer token the
`events_url` and `poll_url` carry a ticket (app/tickets.py) that stands in for the token on those
two routes, for that request only: a browser `EventSource` cannot send a header.

The request is owned by its run (app/lifecycle.py), not by any connection: followers come and go,
the request holds its admission slot until its terminal event. Once a retained log is complete, a
reconnect at or past its last id gets 204, which tells a browser `EventSource` to stop retrying.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from app import sse
from app.admission import Slot
from app.deps import AuthorisedDep, FollowDep, GatewayDep, arrival_of
from app.errors import BadRequestError, NotFoundError, UnavailableError
from app.eventlog import EventLog
from app.redis_store import StoreUnavailableError
from app.state import Gateway
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
    given = request.headers.get("x-request-id") or None
    request_id = await gw.dataplane.start_detached(await request.body(), arrival, given)
    request.scope["state"]["request_id"] = request_id  # the response's X-Request-ID and its access-log line
    ticket = gw.dataplane.ticket_for(request_id)
    query = f"?ticket={ticket}" if ticket is not None else ""  # URL-safe as it is
    poll_url = f"/v1/requests/{request_id}{query}"
    url = f"/v1/requests/{request_id}/events{query}"
    body = {"id": request_id, "events_url": url, "poll_url": poll_url}
    return JSONResponse(body, status_code=202, headers={"Location": url})


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id") or "0"
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise BadRequestError(f"Last-Event-ID must be a non-negative integer, got {raw!r}")
    return int(raw)


async def _log_of(gw: Gateway, request_id: str) -> EventLog:
    try:
        log = await gw.store.get(request_id)
    except StoreUnavailableError as exc:
        raise UnavailableError(f"{exc}; retry shortly", headers={"Retry-After": "1"}) from None
    if log is None:
        raise NotFoundError(
            f"no request {request_id!r} (unknown, or older than the {gw.settings.retention_s:g} s retention)"
        )
    return log


@router.get("/v1/requests/{request_id}/events", responses={204: {"description": "the stream is complete"}})
async def events(request_id: str, request: Request, gw: GatewayDep, _auth: FollowDep) -> Response:
    log = await _log_of(gw, request_id)
    after = _last_event_id(request)
    if log.done and after >= log.last_seq:
        return Response(status_code=204)
    if after > log.last_seq:  # no client has seen an id the log has not written yet
        raise BadRequestError(f"Last-Event-ID {after} is past the stream's last event ({log.last_seq})")
    slot = gw.admission.stream()
    return SlotStream(sse.events(log, after, gw.settings.keepalive_s, gw.group), slot)


@router.get("/v1/requests/{request_id}", responses={404: {"description": "unknown, or past its retention"}})
async def poll(request_id: str, gw: FollowDep) -> JSONResponse:
    """The request's state (running, final or error) and its last event; once it ended, its answer
    (what a JSON call would have got) and that answer's HTTP status."""
    log = await _log_of(gw, request_id)
    try:
        last = (await log.read(log.last_seq - 1))[-1:] if log.last_seq else []
    except (RedisError, OSError) as exc:  # what the store's read lets through
        raise UnavailableError(
            f"stream store unreachable: {exc}; retry shortly", headers={"Retry-After": "1"}
        ) from None
    body: dict[str, Any] = {"id": request_id, "state": "running", "last_event": None}
    if last:
        event = last[0]
        data = orjson.loads(event.data)
        body["last_event"] = {"id": event.seq, "event": event.name, "data": data}
        if event.terminal:
            body.update(state=event.name, status=event.status, answer=data)
    elif log.last_seq:  # dropped between the two reads
        raise NotFoundError(f"no request {request_id!r} (older than the {gw.settings.retention_s:g} s retention)")
    return JSONResponse(body)
