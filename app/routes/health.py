"""Health, metadata and metrics routes (live and ready kept apart, as Kubernetes needs)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import GatewayDep, GroupDep
from app.redis_store import RedisStore
from app.status import refinement

router = APIRouter()


@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


def _readiness(gw: GatewayDep) -> JSONResponse:
    """200 while the gateway can answer (missing members decodable); `down` lists the replicas it
    is doing without, empty when it sees every one, and `reasons` (only while `down` is not empty)
    says why each is out, e.g. "identity mismatch: bundle sha256 ab12… != cd34… (the gateway's)"."""
    down = [name for name, ok in gw.health.ready.items() if not ok]
    body: dict[str, Any] = {"ready": True, "down": down}
    if down:
        body["reasons"] = gw.health.reasons()
    store = gw.store
    if isinstance(store, RedisStore):
        body["stream_store"] = {"url": store.describe(), "ok": store.ok, "reason": store.reason}
        if not store.ever_ok:  # lost later, it fails only /v1/requests (503): JSON and SSE calls go on
            message = f"stream store {store.describe()} unreachable: {store.reason}"
            return JSONResponse({**body, "ready": False, "error": message}, status_code=503)
    if gw.health.is_ready():
        return JSONResponse(body)
    body["ready"] = False
    if gw.health.draining:
        return JSONResponse({**body, "error": "draining: shutting down"}, status_code=503)
    return JSONResponse({**body, "error": f"too few replicas ready to answer; down: {down}"}, status_code=503)


@router.get("/v2/health/ready")
async def ready(gw: GatewayDep) -> JSONResponse:
    return _readiness(gw)


@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    return {
        "name": "coinserve",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "server_sent_events", "coded_replicas", "refinement"],
    }


@router.get("/v2/models")
async def models(gw: GatewayDep) -> dict[str, Any]:
    return {"models": [{"name": gw.group.name, "members": gw.group.members, "coded_replicas": list(gw.group.coded)}]}


def _metadata(gw: GroupDep) -> dict[str, Any]:
    meta = gw.group.metadata()
    meta["parameters"]["replicas_ready"] = dict(gw.health.ready)
    meta["parameters"]["refinement"] = refinement(gw)  # live resolutions per replica, as measured (issue 31)
    return meta


@router.get("/v2/models/{group}")
async def model_metadata(gw: GroupDep) -> dict[str, Any]:
    return _metadata(gw)


@router.get("/v2/models/{group}/versions/{version}")
async def model_version_metadata(group: str, version: str, gw: GatewayDep) -> dict[str, Any]:
    gw.dataplane.check_model(group, version)
    return _metadata(gw)


@router.get("/v2/models/{group}/ready")
async def model_ready(gw: GroupDep) -> JSONResponse:
    return _readiness(gw)


@router.get("/v2/models/{group}/versions/{version}/ready")
async def model_version_ready(group: str, version: str, gw: GatewayDep) -> JSONResponse:
    gw.dataplane.check_model(group, version)
    return _readiness(gw)


@router.get("/metrics")
async def metrics(gw: GatewayDep) -> Response:
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
