"""The gateway's exception hierarchy, written down once, and the one handler that renders it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class CoinserveError(Exception):
    status_code = 500
    headers: dict[str, str] | None = None

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class BadRequestError(CoinserveError):
    status_code = 400


class UnauthorizedError(CoinserveError):
    status_code = 401


class NotFoundError(CoinserveError):
    status_code = 404


class PayloadTooLargeError(CoinserveError):
    status_code = 413


class TooManyRequestsError(CoinserveError):
    status_code = 429


class UnavailableError(CoinserveError):
    status_code = 503


class DeadlineError(CoinserveError):
    status_code = 504


class ReplicaError(Exception):
    """A replica call failed: connection, status, timeout or a malformed reply."""

    def __init__(self, replica: str, kind: str, detail: str) -> None:
        super().__init__(f"{replica}: {kind}: {detail}")
        self.replica, self.kind, self.detail = replica, kind, detail


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(CoinserveError)
    async def coinserve_error(_request: Request, exc: CoinserveError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(400, f"{where}: {first.get('msg')}")

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, "internal error")
