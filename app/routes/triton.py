"""Triton's model configuration, statistics and repository extensions over HTTP, as
`tritonclient.http` calls them (issue 28; docs/compatibility.md). gRPC answers the same from the
same functions (app/rpc.py)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request

from app.deps import GatewayDep, GroupDep
from app.errors import BadRequestError
from app.modelconfig import model_config
from app.state import Gateway
from app.status import refinement

router = APIRouter()

_INDEX_BODY: dict[str, Any] = {
    "requestBody": {
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"ready": {"type": "boolean", "description": "list only models ready to serve"}},
                }
            }
        },
        "required": False,
    }
}
_REFUSED: dict[int | str, dict[str, Any]] = {400: {"description": "models are loaded from the bundle at start"}}


def config_of(gw: Gateway) -> dict[str, Any]:
    return model_config(gw.group, gw.settings.max_batch, refinement(gw))


def statistics_of(gw: Gateway) -> dict[str, Any]:
    """Triton's `ModelStatisticsResponse` for the served group (its one version)."""
    return {"model_stats": [gw.lifecycle.statistics.model_stats(gw.group.name, gw.group.version)]}


def index_of(gw: Gateway, ready_only: bool) -> list[dict[str, str]]:
    """Triton's repository index: the served group and its state (READY, or UNAVAILABLE and why)."""
    group = gw.group
    entry = {"name": group.name, "version": group.version, "state": "READY"}
    if not gw.health.is_ready():
        down = [name for name, ok in gw.health.ready.items() if not ok]
        why = "draining: shutting down" if gw.health.draining else f"too few replicas ready to answer; down: {down}"
        entry = {**entry, "state": "UNAVAILABLE", "reason": why}
    return [entry] if entry["state"] == "READY" or not ready_only else []


def load_refusal(model: str, gw: Gateway, action: str) -> str:
    return (
        f"cannot {action} model {model!r}: coinserve loads its one model group ({gw.group.name!r}) from the "
        f"bundle {str(gw.settings.bundle)!r} at start; restart the gateway and its workers with another bundle"
    )


@router.get("/v2/models/stats")
async def all_statistics(gw: GatewayDep) -> dict[str, Any]:
    """Statistics of every model served: the one group."""
    return statistics_of(gw)


@router.get("/v2/models/{group}/stats")
async def statistics(gw: GroupDep) -> dict[str, Any]:
    return statistics_of(gw)


@router.get("/v2/models/{group}/versions/{version}/stats")
async def version_statistics(group: str, version: str, gw: GatewayDep) -> dict[str, Any]:
    gw.dataplane.check_model(group, version)
    return statistics_of(gw)


@router.get("/v2/models/{group}/config")
async def config(gw: GroupDep) -> dict[str, Any]:
    return config_of(gw)


@router.get("/v2/models/{group}/versions/{version}/config")
async def version_config(group: str, version: str, gw: GatewayDep) -> dict[str, Any]:
    gw.dataplane.check_model(group, version)
    return config_of(gw)


@router.post("/v2/repository/index", openapi_extra=_INDEX_BODY)
async def repository_index(request: Request, gw: GatewayDep) -> list[dict[str, str]]:
    """The served group with its state; body `{"ready": true}` lists it only while it is ready
    (Triton's client sends no body)."""
    body = await request.body()
    try:
        query = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"the repository index request is not JSON: {exc}") from None
    if not isinstance(query, dict) or not isinstance(query.get("ready", False), bool):
        raise BadRequestError('the repository index request must be a JSON object like {"ready": true}')
    return index_of(gw, query.get("ready", False))


@router.post("/v2/repository/models/{model}/load", responses=_REFUSED)
async def load(model: str, gw: GatewayDep) -> None:
    raise BadRequestError(load_refusal(model, gw, "load"))


@router.post("/v2/repository/models/{model}/unload", responses=_REFUSED)
async def unload(model: str, gw: GatewayDep) -> None:
    raise BadRequestError(load_refusal(model, gw, "unload"))
