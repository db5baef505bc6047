"""Annotated dependencies shared by the FastAPI routes (the hot infer route does the same inline)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Query, Request

from app.state import Gateway


def state_of(request: Request) -> Gateway:
    state: Gateway = request.state.gateway
    return state


def arrival_of(request: Request) -> float:
    """When the request arrived (`time.perf_counter()`), stamped by the outermost middleware before
    anything else runs: a deadline counts from here, not from when the handler got to run."""
    arrival: float | None = request.scope.get("state", {}).get("arrival")
    return arrival if arrival is not None else time.perf_counter()


async def gateway(request: Request) -> Gateway:
    return state_of(request)


async def authorised(request: Request, gw: Annotated[Gateway, Depends(gateway)]) -> Gateway:
    gw.dataplane.authorise(request.headers.get("authorization"))
    return gw


async def may_follow(
    request: Request,
    request_id: str,
    gw: Annotated[Gateway, Depends(gateway)],
    ticket: Annotated[
        str | None,
        Query(description="the ticket `events_url` carries: stands in for the bearer token, for this request only"),
    ] = None,
) -> Gateway:
    """`/v1/requests/{request_id}[/events]`: the bearer token, or a ticket for that request (a browser
    `EventSource` cannot send a header)."""
    gw.dataplane.authorise_follow(request.headers.get("authorization"), request_id, ticket)
    return gw


async def known_group(group: str, gw: Annotated[Gateway, Depends(gateway)]) -> Gateway:
    gw.dataplane.check_model(group, None)
    return gw


GatewayDep = Annotated[Gateway, Depends(gateway)]
AuthorisedDep = Annotated[Gateway, Depends(authorised)]
GroupDep = Annotated[Gateway, Depends(known_group)]
FollowDep = Annotated[Gateway, Depends(may_follow)]
