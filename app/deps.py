"""Annotated dependencies shared by the routes."""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import Depends, Request

from app.errors import NotFoundError, UnauthorizedError
from app.state import Gateway


def state_of(request: Request) -> Gateway:
    state: Gateway = request.state.gateway
    return state


def arrival_of(request: Request) -> float:
    """When the request arrived (`time.perf_counter()`), stamped by the outermost middleware before
    anything else runs: a deadline counts from here, not from when the handler got to run."""
    arrival: float | None = request.scope.get("state", {}).get("arrival")
    return arrival if arrival is not None else time.perf_counter()


def check_auth(gw: Gateway, request: Request) -> None:
    """Bearer-token check when a token is configured; constant-time, no detail in the error."""
    token = gw.settings.auth_token
    if token is not None:
        given = request.headers.get("authorization", "")
        expected = f"Bearer {token.get_secret_value()}"
        if not hmac.compare_digest(given.encode(errors="surrogateescape"), expected.encode()):
            raise UnauthorizedError("unauthorized", headers={"WWW-Authenticate": "Bearer"})


def check_group(gw: Gateway, group: str) -> None:
    if group != gw.group.name:
        raise NotFoundError(f"no model group {group!r}; this gateway serves {gw.group.name!r}")


def check_version(gw: Gateway, version: str | None) -> None:
    if version is not None and version != gw.group.version:
        raise NotFoundError(
            f"no version {version!r} of model group {gw.group.name!r}; its version is {gw.group.version!r}"
        )


async def gateway(request: Request) -> Gateway:
    return state_of(request)


async def authorised(request: Request, gw: Annotated[Gateway, Depends(gateway)]) -> Gateway:
    check_auth(gw, request)
    return gw


async def known_group(group: str, gw: Annotated[Gateway, Depends(gateway)]) -> Gateway:
    check_group(gw, group)
    return gw


GatewayDep = Annotated[Gateway, Depends(gateway)]
AuthorisedDep = Annotated[Gateway, Depends(authorised)]
GroupDep = Annotated[Gateway, Depends(known_group)]
