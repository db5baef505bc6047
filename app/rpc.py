"""The gRPC surface: OIP v2 `inference.GRPCInferenceService` as Triton's and KServe's clients call it
(DESIGN §3), on its own port (`--grpc-port`, default 8001, 0: off), in the gateway's event loop.

Like every surface it parses, admits, starts the request's owned task (app/lifecycle.py) and reads
its event log: `ModelInfer` waits for the terminal event; `ModelStreamInfer` (Triton's decoupled
style) sends every event of each request as it is appended, each response marked with parameters
`event` (coarse | refined | final) and `triton_final_response` (true only on the last one). The
deadline is the smaller of `deadline_ms` and the call's gRPC deadline (less a margin, so that the
answer arrives before the client gives up); a cancelled call cancels its request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import anyio
import grpc
import orjson

from app.admission import Slot, admit_request, admit_stream, check_deadline
from app.errors import CoinserveError
from app.eventlog import Event, MemoryLog, follow, terminal
from app.lifecycle import CLIENT_GONE, Admitted, Owned
from app.responses import chosen, parts
from app.routes.health import server_metadata
from app.validation import parse_request
from protocol.grpc_service import METHODS, SERVICE, message, set_parameter, to_v2
from protocol.v2 import InferRequest, datatype_of, tensor_bytes

if TYPE_CHECKING:
    from app.state import Gateway

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

    # inference -----------------------------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        arrival = time.perf_counter()
        try:
            parsed, owned = self._start(request, context, arrival, stream=False)
        except Refused as exc:
            await context.abort(code_of(exc.status), exc.message)
        try:
            event = await terminal(owned.log)
        finally:
            await self._end(owned)
        if event.name == "error":
            await context.abort(code_of(event.status), _error_of(event))
        return self._response(event, parsed)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Each request of the stream in turn; every event of each one as a response."""
        gw = self.gw
        respond = message("ModelStreamInferResponse")
        async for request in requests:
            arrival = time.perf_counter()
            stream_slot: Slot | None = None
            try:
                stream_slot = admit_stream(gw)
                parsed, owned = self._start(request, context, arrival, stream=True)
            except (Refused, CoinserveError) as exc:
                if stream_slot is not None:
                    stream_slot.release()
                yield respond(error_message=str(exc))
                continue
            try:
                async for event in follow(owned.log, 0, gw.settings.keepalive_s):
                    if event is None:
                        continue
                    if event.name == "error":
                        yield respond(error_message=_error_of(event))
                    else:
                        yield respond(infer_response=self._response(event, parsed, streamed=True))
            finally:
                stream_slot.release()
                await self._end(owned)

    def _start(
        self, request: Any, context: grpc.aio.ServicerContext, arrival: float, stream: bool
    ) -> tuple[InferRequest, Owned]:
        """Check, parse and admit a request, and start its owned task; Refused when that fails."""
        gw = self.gw
        try:
            self._check_auth(context)
            if not self._is_model(request.model_name, request.model_version):
                raise Refused(404, self._unknown(request.model_name, request.model_version))
            slot = admit_request(gw)
        except CoinserveError as exc:
            raise Refused(exc.status_code, exc.message) from exc
        try:
            body, length = to_v2(request)
            parsed, options = parse_request(body, length, gw.group, gw.settings, stream)
            options = replace(options, deadline_ms=self._deadline_ms(options.deadline_ms, context, arrival))
            check_deadline(gw, options.deadline_ms, options.members, arrival)
        except CoinserveError as exc:
            slot.release()
            raise Refused(exc.status_code, exc.message) from exc
        except ValueError as exc:  # what to_v2 cannot express
            slot.release()
            raise Refused(400, str(exc)) from exc
        except BaseException:
            slot.release()
            raise
        endpoint = "grpc_stream" if stream else "grpc"
        admitted = Admitted(parsed.images, options, arrival, parsed.request_id, endpoint, slot)
        return parsed, gw.lifecycle.start(MemoryLog(), admitted)

    async def _end(self, owned: Owned) -> None:
        """However the call ended (also cancelled by its client): stop the request if it still runs
        and wait until it has written its terminal event."""
        if owned.task is not None and not owned.task.done():
            owned.cancel(CLIENT_GONE)
        with anyio.CancelScope(shield=True):
            if owned.task is not None:
                await asyncio.gather(owned.task, return_exceptions=True)

    def _deadline_ms(
        self, deadline_ms: float | None, context: grpc.aio.ServicerContext, arrival: float
    ) -> float | None:
        remaining: float | None = context.time_remaining()
        if remaining is None:
            return deadline_ms
        spent_ms = (time.perf_counter() - arrival) * 1000
        from_call = max(1.0, remaining * 1000 + spent_ms - DEADLINE_MARGIN_MS)
        return from_call if deadline_ms is None else min(deadline_ms, from_call)

    def _check_auth(self, context: grpc.aio.ServicerContext) -> None:
        token = self.gw.settings.auth_token
        if token is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        given = str(metadata.get("authorization", ""))
        expected = f"Bearer {token.get_secret_value()}"
        if not hmac.compare_digest(given.encode(errors="surrogateescape"), expected.encode()):
            raise Refused(401, "unauthorized")

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
        for key, value in parameters.items():
            set_parameter(response.parameters[key], value)
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
