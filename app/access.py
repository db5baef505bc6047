"""Pure ASGI middleware: request ids, structured access logs, and the body-size limit.

Pure ASGI (not BaseHTTPMiddleware) so that streaming responses pass through untouched. The body
limit is checked on Content-Length before anything is read, and again while the body streams in.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("coinserve.access")
REQUEST_ID = "x-request-id"


class BodyTooLargeError(Exception):
    pass


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope["headers"])
        given = headers.get(REQUEST_ID.encode(), b"").decode("latin-1")
        request_id = given if given and len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["arrival"] = request_id, start
        status = {"code": 0, "started": False}
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and (len(length) > 18 or int(length) > self.max_body_bytes):
            await _too_large(send, request_id, self.max_body_bytes)
            log_access(scope, 413, start, request_id)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLargeError
            return message

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                # read at the response: a route may have named the request (POST /v1/requests: its id)
                tag = state["request_id"].encode()
                message["headers"] = [*message.get("headers", []), (REQUEST_ID.encode(), tag)]
            await send(message)

        try:
            await self.app(scope, limited_receive, tagged_send)
        except BodyTooLargeError:
            if not status["started"]:
                await _too_large(send, request_id, self.max_body_bytes)
                status["code"] = 413
        finally:
            log_access(scope, int(status["code"]), start, state["request_id"])


def log_access(scope: Scope, status: int, start: float, request_id: str) -> None:
    """One structured access-log line (at INFO) per request, on every route."""
    if logger.isEnabledFor(logging.INFO):
        record: dict[str, Any] = {
            "request_id": request_id,
            "method": scope.get("method"),
            "path": scope.get("path"),
            "status": status,
            "duration_ms": round((time.perf_counter() - start) * 1000, 3),
            "client": (scope.get("client") or ("", 0))[0],
        }
        logger.info("%s", json.dumps(record))


async def _too_large(send: Send, request_id: str, limit: int) -> None:
    body = json.dumps({"error": f"request body larger than the {limit}-byte limit"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (REQUEST_ID.encode(), request_id.encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
