"""The gRPC surface: OIP v2 `inference.GRPCInferenceService` as Triton's and KServe's clients call it
(DESIGN §3), on its own port (`--grpc-port`, default 8001, 0: off), in the gateway's event loop.

Like every surface it calls the data plane (app/dataplane.py), which starts the request, and reads
its event log: `ModelInfer` waits for the terminal event; `ModelStreamInfer` (Triton's decoupled
style) sends every event of each request as it is appended, each response marked with parameters
`event` (coarse | refined | final) and `triton_final_response` (true only on the last one). The
deadline is the smaller of `deadline_ms` and the call's gRPC deadline (less a margin, so that the
answer arrives before the client gives up); a cancelled call cancels its request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
from google.protobuf import json_format

from app.dataplane import Started
from app.errors import CoinserveError
from app.eventlog import Event, follow
from app.lifecycle import CLIENT_GONE
from app.responses import chosen, parts
from app.routes.health import server_metadata
from app.routes.triton import config_of, index_of, load_refusal, statistics_of
from app.state import Gateway
from protocol.grpc_service import METHODS, SERVICE, message, set_parameters, to_v2
from protocol.v2 import InferRequest, datatype_of, tensor_bytes

logger = logging.getLogger(__name__)
DEADLINE_MARGIN_MS = 15.0  # the answer must be on the wire before the client's own deadline fires

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def code_of(status: int) -> grpc.StatusCode:
    return CODES.get(status, grpc.StatusCode.INTERNAL)


class Refused(Exception):
    """A call refused before its request started: the status a JSON caller would get, and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class InferenceService:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    # health and metadata -------------------------------------------------------------------------
    async def ServerLive(self, _request: Any, _context: grpc.aio.ServicerContext) -> Any:
        return message("ServerLiveResponse")(live=True)

    async def ServerReady(self, _request: Any, _context: grpc.aio.ServicerContext) -> Any:
        return message("ServerReadyResponse")(ready=self.gw.health.is_ready())

    async def ModelReady(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        known = self._is_model(request.name, request.version)
        return message("ModelReadyResponse")(ready=known and self.gw.health.is_ready())

    async def ServerMetadata(self, _request: Any, _context: grpc.aio.ServicerContext) -> Any:
        meta = await server_metadata()
        return message("ServerMetadataResponse")(**meta)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not self._is_model(request.name, request.version):
            await context.abort(grpc.StatusCode.NOT_FOUND, self._unknown(request.name, request.version))
        meta = self.gw.group.metadata()
        return message("ModelMetadataResponse")(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=meta["inputs"],
            outputs=meta["outputs"],
        )

    # Triton's model configuration, statistics and repository extensions (app/routes/triton.py) ---
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not self._is_model(request.name, request.version):
            await context.abort(grpc.StatusCode.NOT_FOUND, self._unknown(request.name, request.version))
        return json_format.ParseDict({"config": config_of(self.gw)}, message("ModelConfigResponse")())

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """An empty name asks for every model's statistics, as in Triton: the one group's."""
        if (request.name or request.version) and not self._is_model(request.name, request.version):
            await context.abort(grpc.StatusCode.NOT_FOUND, self._unknown(request.name, request.version))
        return json_format.ParseDict(statistics_of(self.gw), message("ModelStatisticsResponse")())

    async def RepositoryIndex(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        models = index_of(self.gw, request.ready)
        return json_format.ParseDict({"models": models}, message("RepositoryIndexResponse")())

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code_of(400), load_refusal(request.model_name, self.gw, "load"))

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code_of(400), load_refusal(request.model_name, self.gw, "unload"))

    # inference -----------------------------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        arrival = time.perf_counter()
        try:
            started = self._start(request, context, arrival, stream=False)
        except Refused as exc:
            await context.abort(code_of(exc.status), exc.message)
        try:
            event = await started.owned.finished
        finally:
            started.owned.cancel(CLIENT_GONE)  # a no-op once it has ended; a cancelled call ends it
        if event.name == "error":
            await context.abort(code_of(event.status), _error_of(event))
        return self._response(event, started.request)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Each request of the stream in turn; every event of each one as a response."""
        respond = message("ModelStreamInferResponse")
        async for request in requests:
            arrival = time.perf_counter()
            try:
                started = self._start(request, context, arrival, stream=True)
            except Refused as exc:
                yield respond(error_message=exc.message)
                continue
            owned = started.owned
            try:
                async for event in follow(owned.log, 0, self.gw.settings.keepalive_s):
                    if event is None:
                        continue
                    if event.name == "error":
                        yield respond(error_message=_error_of(event))
                    else:
                        yield respond(infer_response=self._response(event, started.request, streamed=True))
            finally:
                owned.cancel(CLIENT_GONE)
                if started.stream_slot is not None:
                    started.stream_slot.release()

    def _start(self, request: Any, context: grpc.aio.ServicerContext, arrival: float, stream: bool) -> Started:
        """Translate the call into the data plane's terms and start it; Refused when that fails."""
        dp = self.gw.dataplane
        try:
            metadata = dict(context.invocation_metadata() or ())
            dp.authorise(str(metadata.get("authorization", "")))
            if not self._is_model(request.model_name, request.model_version):
                raise Refused(404, self._unknown(request.model_name, request.model_version))
            slots = dp.admit(stream)
            try:
                body, length = to_v2(request)
            except ValueError as exc:  # what to_v2 cannot express
                slots[0].release()
                if slots[1] is not None:
                    slots[1].release()
                raise Refused(400, str(exc)) from exc
            endpoint = "grpc_stream" if stream else "grpc"
            return dp.start(slots, body, length, arrival, endpoint, lambda ms: self._deadline_ms(ms, context, arrival))
        except CoinserveError as exc:
            raise Refused(exc.status_code, exc.message) from exc

    def _deadline_ms(
        self, deadline_ms: float | None, context: grpc.aio.ServicerContext, arrival: float
    ) -> float | None:
        remaining: float | None = context.time_remaining()
        if remaining is None:
            return deadline_ms
        spent_ms = (time.perf_counter() - arrival) * 1000
        from_call = max(1.0, remaining * 1000 + spent_ms - DEADLINE_MARGIN_MS)
        return from_call if deadline_ms is None else min(deadline_ms, from_call)

    def _is_model(self, name: str, version: str) -> bool:
        group = self.gw.group
        return name == group.name and version in ("", group.version)

    def _unknown(self, name: str, version: str) -> str:
        group = self.gw.group
        if name != group.name:
            return f"no model group {name!r}; this gateway serves {group.name!r}"
        return f"no version {version!r} of model group {group.name!r}; its version is {group.version!r}"

    def _response(self, event: Event, parsed: InferRequest, streamed: bool = False) -> Any:
        header, tensors = parts(event, self.gw.group, parsed.request_id)
        response = message("ModelInferResponse")(
            model_name=header["model_name"], model_version=header.get("model_version", ""), id=parsed.request_id or ""
        )
        for name, values, _ in chosen(tensors, parsed, self.gw.group):  # gRPC outputs are always raw
            response.outputs.add(name=name, datatype=datatype_of(values), shape=list(values.shape))
            response.raw_output_contents.append(tensor_bytes(values))
        parameters = dict(header.get("parameters") or {})
        if streamed:
            parameters["event"] = event.name
            parameters["triton_final_response"] = event.name == "final"
        set_parameters(response.parameters, parameters)  # typed; None (e.g. float32's planes) left out
        return response


def _error_of(event: Event) -> str:
    body = orjson.loads(event.data)
    return str(body.get("error", "error")) if isinstance(body, dict) else "error"


def handler(gw: Gateway) -> grpc.GenericRpcHandler:
    service = InferenceService(gw)
    handlers = {}
    for method, (request_name, response_name, streaming) in METHODS.items():
        request_type, response_type = message(request_name), message(response_name)
        make = grpc.stream_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        handlers[method] = make(
            getattr(service, method),
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def start_server(gw: Gateway, host: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])  # a taken port fails, not shares
    server.add_generic_rpc_handlers((handler(gw),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    logger.info("gRPC GRPCInferenceService on %s:%d", host, bound)
    return server
