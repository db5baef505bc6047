"""POST /v1/requests and GET /v1/requests/{id}/events: a detached request whose event log a browser
`EventSource` can follow, and resume with `Last-Event-ID` within the retention window.

The request is owned by its task (app/lifecycle.py), not by any connection: followers come and go,
the request holds its admission slot until its terminal event. Once a retained log is complete, a
reconnect at or past its last id gets 204, which tells a browser `EventSource` to stop retrying.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.admission import admit_request, admit_stream, check_deadline
from app.deps import AuthorisedDep, GatewayDep, arrival_of
from app.errors import BadRequestError, NotFoundError, TooManyRequestsError, UnavailableError
from app.lifecycle import Admitted
from app.redis_store import StoreUnavailableError
from app.responses import is_default
from app.routes.infer import AdmittedStream, sse_events
from app.validation import parse_request
from protocol.v2 import InferRequestModel

router = APIRouter()


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
    slot = admit_request(gw)  # held until the request's terminal event, not just while parsing
    try:
        parsed, options = parse_request(await request.body(), None, gw.group, gw.settings, stream=True)
        if not is_default(parsed):
            raise BadRequestError("outputs and binary_data_output belong to /v2/.../infer; /v1 streams every output")
        images, given_id = parsed.images, parsed.request_id
        check_deadline(gw, options.deadline_ms, options.members, arrival)
        request_id = given_id or uuid.uuid4().hex
        in_use = BadRequestError(f"id {request_id!r} is already in use; leave id out to get a fresh one")
        try:
            if await gw.store.get(request_id) is not None:
                raise in_use
            log = await gw.store.create(request_id)
        except KeyError:  # created by another gateway between the two calls
            raise in_use from None
        except StoreUnavailableError as exc:
            raise UnavailableError(f"{exc}; retry shortly", headers={"Retry-After": "1"}) from None
        if log is None:
            raise TooManyRequestsError(
                "too many retained requests still running; retry shortly", headers={"Retry-After": "1"}
            )
    except BaseException:
        slot.release()
        raise
    gw.lifecycle.start(log, Admitted(images, options, arrival, request_id, "requests", slot))
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
    return AdmittedStream(sse_events(gw, log, after), admit_stream(gw))
