"""`POST /v2/models/{group}[/versions/{v}]/infer` as a plain ASGI handler: the gateway's hot route.

It sits in front of the FastAPI app, which keeps every other route, the lifespan and the OpenAPI
document (the infer routes are documented there by app/routes/infer.py), because the framework's
per-request layers (routing, dependency solving, middleware) cost more than everything else the
gateway does for a request (docs/serving.md). What the middleware does for other routes is done
inline here: the request id (`X-Request-ID`, echoed or made), the body-size limit (on
Content-Length before anything is read, and while the body streams in), the bearer token, CORS
headers for configured origins, and one access-log line at INFO.

JSON, binary and SSE answers all come from the data plane (app/dataplane.py): JSON and binary
wait for the request's terminal event; SSE follows its log (app/sse.py). A client that hangs up
cancels its request, which still ends its log with one terminal event and gives back its slot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import sse
from app.access import log_access
from app.dataplane import DataPlane, Started
from app.errors import CoinserveError, PayloadTooLargeError
from app.lifecycle import CLIENT_GONE, Owned
from app.responses import error_body, render
from app.settings import GatewaySettings
from app.validation import header_length
from protocol.v2 import HEADER_LENGTH

logger = logging.getLogger(__name__)
_PREFIX = "/v2/models/"
_SUFFIX = "/infer"
_HEADER_LENGTH = HEADER_LENGTH.lower().encode()
_JSON = b"application/json"


def infer_route(path: str) -> tuple[str, str | None] | None:
    """(group, version) when `path` is an infer route, else None."""
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    parts = path[len(_PREFIX) : -len(_SUFFIX)].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


class _ClientGone(Exception):
    pass


class HotPath:
    def __init__(self, app: ASGIApp, settings: GatewaySettings) -> None:
        self.app = app
        self.settings = settings
        self.max_body = settings.max_body_bytes
        origins = [o.strip().rstrip("/") for o in settings.cors_origins.split(",") if o.strip()]
        self.any_origin = "*" in origins
        self.origins = {o.encode() for o in origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = infer_route(scope["path"])
            if route is not None:
                await self.infer(scope, receive, send, *route)
                return
        await self.app(scope, receive, send)

    async def infer(self, scope: Scope, receive: Receive, send: Send, group: str, version: str | None) -> None:
        arrival = time.perf_counter()
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"")
        request_id = given if given and len(given) <= 128 and given.decode("latin-1").isprintable() else None
        extra = [(b"x-request-id", request_id or os.urandom(16).hex().encode()), *self._cors(headers)]
        status = 500
        try:
            dataplane = scope["state"]["gateway"].dataplane
            status = await self._serve(dataplane, headers, extra, arrival, receive, send, group, version)
        finally:
            log_access(scope, status, arrival, extra[0][1].decode())

    async def _serve(
        self,
        dp: DataPlane,
        headers: dict[bytes, bytes],
        extra: list[tuple[bytes, bytes]],
        arrival: float,
        receive: Receive,
        send: Send,
        group: str,
        version: str | None,
    ) -> int:
        try:
            dp.authorise(headers.get(b"authorization"))  # first: strangers learn nothing, not even group names
            dp.check_model(group, version)
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and (len(length) > 18 or int(length) > self.max_body):
                raise PayloadTooLargeError(f"request body larger than the {self.max_body}-byte limit")
            stream = b"text/event-stream" in headers.get(b"accept", b"")
            slots = dp.admit(stream)
            try:
                body = await self._body(receive)
                binary_length = header_length(_text(headers.get(_HEADER_LENGTH)))
            except BaseException:
                slots[0].release()
                if slots[1] is not None:
                    slots[1].release()
                raise
            started = dp.start(slots, body, binary_length, arrival, "infer_stream" if stream else "infer")
            del body  # parsed: not held while the request runs (a burst of them is the gateway's peak memory)
        except CoinserveError as exc:
            close = isinstance(exc, PayloadTooLargeError)
            await _respond(send, exc.status_code, error_body(exc.message), _JSON, extra, exc.headers, close)
            return exc.status_code
        except _ClientGone:
            return 499
        except Exception:
            logger.exception("unhandled error")
            await _respond(send, 500, error_body("internal error"), _JSON, extra)
            return 500
        if started.stream_slot is not None:
            await self._stream(dp, started, extra, receive, send)
            return 200
        return await self._answer(dp, started, extra, receive, send)

    async def _body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise PayloadTooLargeError(f"request body larger than the {self.max_body}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _answer(
        self, dp: DataPlane, started: Started, extra: list[tuple[bytes, bytes]], receive: Receive, send: Send
    ) -> int:
        """The terminal event as the answer; a client that hangs up first cancels its request."""
        owned, finished = started.owned, started.owned.finished
        if not finished.done():
            loop = asyncio.get_running_loop()
            watch = Watch(loop, receive, owned)
            later = loop.call_later(WATCH_AFTER_S, watch.start)
            try:
                await finished
            finally:
                later.cancel()
                watch.stop()
        event = finished.result()
        body, media_type, more = render(event, started.request, dp.group)
        retry = {"Retry-After": "1"} if event.status == 503 else None
        await _respond(send, event.status, body, media_type.encode(), [*extra, *_encoded(more)], retry)
        return event.status

    async def _stream(
        self, dp: DataPlane, started: Started, extra: list[tuple[bytes, bytes]], receive: Receive, send: Send
    ) -> None:
        owned = started.owned
        headers = [(b"content-type", sse.MEDIA_TYPE.encode()), *_encoded(sse.STREAM_HEADERS), *extra]

        async def watch() -> None:
            await _disconnect(receive)
            owned.cancel(CLIENT_GONE)

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for chunk in sse.events(owned.log, 0, dp.settings.keepalive_s, dp.group, started.request):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            owned.cancel(CLIENT_GONE)  # a no-op once it has ended
            if started.stream_slot is not None:
                started.stream_slot.release()

    def _cors(self, headers: dict[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        """What Starlette's CORSMiddleware adds to a simple request from an allowed origin."""
        origin = headers.get(b"origin")
        if origin is None or not (self.any_origin or origin in self.origins):
            return []
        out = [(b"access-control-allow-origin", b"*" if self.any_origin else origin)]
        if not self.any_origin:
            out += [(b"access-control-allow-credentials", b"true"), (b"vary", b"Origin")]
        out.append((b"access-control-expose-headers", b"X-Request-ID, Retry-After, " + HEADER_LENGTH.encode()))
        return out


WATCH_AFTER_S = 0.1  # a JSON request still running after this starts watching for its client's hang-up


class Watch:
    """A JSON request's client, watched for a hang-up (which cancels the request) only once the
    request has run WATCH_AFTER_S: most end sooner, and a task per request cost the gateway a task
    and the garbage of its cancellation."""

    def __init__(self, loop: asyncio.AbstractEventLoop, receive: Receive, owned: Owned) -> None:
        self.loop, self.receive, self.owned = loop, receive, owned
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = self.loop.create_task(self._watch())

    async def _watch(self) -> None:
        await _disconnect(self.receive)
        self.owned.cancel(CLIENT_GONE)  # ends it now: the terminal event is written at once

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.owned.cancel(CLIENT_GONE)  # only if it still runs: this handler itself was cancelled


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _encoded(headers: dict[str, str] | None) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    media_type: bytes,
    extra: list[tuple[bytes, bytes]],
    more: dict[str, str] | None = None,
    close: bool = False,
) -> None:
    headers = [(b"content-type", media_type), (b"content-length", b"%d" % len(body)), *extra, *_encoded(more)]
    if close:
        headers.append((b"connection", b"close"))
    start: Message = {"type": "http.response.start", "status": status, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body})
