"""POST /v2/models/{name}/infer as a plain ASGI handler: the worker's hot path.

It sits in front of the FastAPI app (which keeps every other route, and the lifespan) because the
framework's routing and middleware cost more per call than the forward pass of a small model
(docs/serving.md). Streaming answers one NDJSON line per completed resolution; a client that goes
away is noticed on `receive()` and its job is cancelled before the next resolution.
"""

from __future__ import annotations

import asyncio
import hmac

import orjson
import torch
from starlette.types import ASGIApp, Receive, Scope, Send

from protocol.v2 import HEADER_LENGTH, OUTPUT_NAME, ProtocolError, encode_response, parse_request
from workers.batcher import Job, Result
from workers.faults import Verdict
from workers.server import PARAMETERS, SECRET_HEADER, Served, WorkerState

_JSON = [(b"content-type", b"application/json")]
_NDJSON = [(b"content-type", b"application/x-ndjson")]
_HEADER_LENGTH = HEADER_LENGTH.lower().encode()
_SECRET = SECRET_HEADER.lower().encode()
MAX_BODY = 8 << 20  # a 64-image binary request is 200 kB; JSON about 1 MB


class InferEndpoint:
    def __init__(self, app: ASGIApp, models: list[str]) -> None:
        self.app = app
        self.paths = {f"/v2/models/{model}/infer": model for model in models}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = self.paths.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if model is not None:
            worker: WorkerState = scope["state"]["worker"]
            await _infer(worker, worker.models[model], scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = _JSON) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [*headers, (b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, status: int, message: str) -> None:
    await _respond(send, status, orjson.dumps({"error": message}))


class _ClientGone(Exception):
    pass


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body, or None when it exceeds MAX_BODY; raises _ClientGone if the client left."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _infer(worker: WorkerState, served: Served, scope: Scope, receive: Receive, send: Send) -> None:
    headers = dict(scope["headers"])
    secret = worker.settings.shared_secret
    if secret is not None and not hmac.compare_digest(headers.get(_SECRET, b""), secret.get_secret_value().encode()):
        worker.metrics.requests.labels("unauthorized").inc()
        await _error(send, 401, "unauthorized")
        return
    try:
        body = await _read_body(receive)
    except _ClientGone:
        worker.metrics.requests.labels("cancelled").inc()
        return
    if body is None:
        await _error(send, 413, f"request body larger than {MAX_BODY} bytes")
        return
    try:
        job, stream, request_id = job_from(worker, served, body, headers.get(_HEADER_LENGTH))
    except ProtocolError as exc:
        worker.metrics.requests.labels("bad_request").inc()
        await _error(send, 400, str(exc))
        return
    verdict = worker.faults.verdict() if worker.faults else Verdict.SERVE
    if verdict is Verdict.ERROR:
        worker.metrics.requests.labels("injected_error").inc()
        await _error(send, 500, "injected fault")
        return
    listener = asyncio.create_task(_watch_disconnect(receive, job))
    await asyncio.sleep(0)  # let the listener look first: after a pause, many queued callers have long gone
    if job.cancelled:
        listener.cancel()
        worker.metrics.requests.labels("cancelled").inc()
        return
    served.batcher.submit(job)
    worker.metrics.in_flight.inc()
    outcome = "cancelled"
    try:
        serve = _stream if stream else _single
        outcome = await serve(worker, served.name, job, verdict, request_id, send)
    finally:
        job.cancelled = True  # a no-op once finished; stops the compute if we leave early
        served.batcher.finished(job)
        listener.cancel()
        worker.metrics.in_flight.dec()
        worker.metrics.requests.labels(outcome).inc()


async def _watch_disconnect(receive: Receive, job: Job) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancelled = True
    job.results.put_nowait(None)  # wake the writer: nothing more will be sent


def job_from(
    worker: WorkerState, served: Served, body: bytes, header_length: bytes | None
) -> tuple[Job, bool, str | None]:
    try:
        length = int(header_length) if header_length is not None else None
    except ValueError as exc:
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer") from exc
    images, parameters, request_id = parse_request(
        body, length, worker.settings.max_request_batch, PARAMETERS, worker.spec.input
    )
    last = served.engine.plan.resolutions - 1
    start = parameters.get("min_resolution", 0)
    if type(start) is not int or not 0 <= start <= last:
        raise ProtocolError(f"parameters.min_resolution must be an integer in 0..{last}")
    for flag in ("stream", "final_only"):
        if not isinstance(parameters.get(flag, False), bool):
            raise ProtocolError(f"parameters.{flag} must be true or false")
    stream = bool(parameters.get("stream", False))
    final_only = bool(parameters.get("final_only", not stream))
    margin = parameters.get("stop_margin")
    if margin is not None and (type(margin) not in (int, float) or not 0 < margin <= 1):
        raise ProtocolError(f"parameters.stop_margin must be a number in (0, 1], got {margin!r}")
    job = Job(
        torch.from_numpy(images.copy()), start, final_only, None if final_only or margin is None else float(margin)
    )
    return job, stream, request_id


def _encode(model: str, result: Result, request_id: str | None) -> bytes:
    parameters: dict[str, object] = {"resolution": result.index, "planes": result.planes, "exact": result.final}
    if result.stopped:
        parameters["stopped"] = True  # no later resolution follows: confident at this one (stop_margin)
    return encode_response(model, result.probs, parameters, request_id)


def garbage(worker: WorkerState, model: str, result: Result) -> bytes:
    """A malformed reply of the configured kind (fault injection)."""
    kind = worker.settings.faults.garbage_kind
    if kind == "shape":
        return encode_response(model, result.probs[:, :3], {"resolution": result.index})
    if kind == "nan":
        rows, classes = result.probs.shape
        data = ",".join(["NaN"] * (rows * classes))
        tensor = f'{{"name":"{OUTPUT_NAME}","datatype":"FP32","shape":[{rows},{classes}],"data":[{data}]}}'
        head = f'{{"model_name":"{model}","outputs":[{tensor}],'
        return (head + f'"parameters":{{"resolution":{result.index}}}}}').encode()
    good = _encode(model, result, None)
    return good[: len(good) // 2]  # truncated (for "close" the connection also breaks off)


async def _next(job: Job) -> Result | None:
    item = await job.results.get()
    if isinstance(item, BaseException):
        raise item
    return item


async def _single(
    worker: WorkerState, model: str, job: Job, verdict: Verdict, request_id: str | None, send: Send
) -> str:
    last: Result | None = None
    while (result := await _next(job)) is not None:
        last = result
    if last is None or not last.final:
        return "cancelled"
    if worker.faults:
        await worker.faults.before_reply()
    if verdict is Verdict.GARBAGE:
        await _respond(send, 200, garbage(worker, model, last))
        return "garbage"
    await _respond(send, 200, _encode(model, last, request_id))
    return "ok"


async def _stream(
    worker: WorkerState, model: str, job: Job, verdict: Verdict, request_id: str | None, send: Send
) -> str:
    started = False

    async def write(chunk: bytes, more: bool) -> None:
        nonlocal started
        if not started:
            await send({"type": "http.response.start", "status": 200, "headers": _NDJSON})
            started = True
        await send({"type": "http.response.body", "body": chunk, "more_body": more})

    first = True
    try:
        while (result := await _next(job)) is not None:
            if worker.faults:
                await (worker.faults.before_reply() if first else worker.faults.before_step())
            first = False
            if verdict is Verdict.GARBAGE:
                close = worker.settings.faults.garbage_kind == "close"
                await write(garbage(worker, model, result) + (b"" if close else b"\n"), more=close)
                if close:
                    raise ConnectionAbortedError("injected fault: connection closed mid-stream")
                return "garbage"
            await write(_encode(model, result, request_id) + b"\n", more=not (result.final or result.stopped))
            if result.final or result.stopped:
                return "ok" if result.final else "stopped"
    except Exception as exc:
        if isinstance(exc, ConnectionAbortedError):
            raise
        if started:
            await write(orjson.dumps({"error": f"forward pass failed: {exc}"}) + b"\n", more=False)
        else:
            await _error(send, 500, f"forward pass failed: {exc}")
        return "error"
    return "cancelled"  # the client went away before the final resolution
