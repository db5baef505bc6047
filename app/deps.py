"""Annotated dependencies shared by the FastAPI routes (the hot infer route does the same inline)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

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


async def known_group(group: str, gw: Annotated[Gateway, Depends(gateway)]) -> Gateway:
    gw.dataplane.check_model(group, None)
    return gw


GatewayDep = Annotated[Gateway, Depends(gateway)]
AuthorisedDep = Annotated[Gateway, Depends(authorised)]
GroupDep = Annotated[Gateway, Depends(known_group)]
