"""The worker's end of the gateway channel (protocol/channel.py): one asyncio Protocol per gateway
connection, batch-oriented both ways.

A connection is trusted only after a valid `Hello` (protocol version and shared secret); until then
nothing else is read. Each `Work` frame's submits become batcher jobs (workers/batcher.py keeps the
policy: first steps before refinements, coarsest and oldest first, never a cancelled or expired step,
stop_margin) and its cancels mark jobs cancelled, so their next step is never started. Every result
of a computed step goes back in one `Step` frame per connection, flushed once per event-loop tick
(`call_soon`: no timer, no added latency). A frame that breaks the protocol (over the size cap,
truncated, garbled, an unknown message, a reused call id) closes its connection with one log line
naming the peer and the reason; calls on other connections are not affected.

The fault knobs act here, per call, as they did per HTTP call: an injected error is a `Failure`
entry, garbage is a malformed result (NaN, a wrong width; "truncated" garbles the frame and
"close" cuts the connection, as a broken peer would), delays and pause windows hold a call's
results back.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any

import numpy as np
import torch

from protocol.channel import (
    FLOAT,
    VERSION,
    Failure,
    FrameError,
    FrameReader,
    Hello,
    Outbox,
    Ping,
    Pong,
    Refuse,
    Result,
    Step,
    Submit,
    Welcome,
    Work,
    encode,
    tensors,
)
from workers.batcher import Job, Result as StepResult, StepResults
from workers.faults import Verdict
from workers.state import WorkerState

logger = logging.getLogger(__name__)
HELLO_TIMEOUT_S = 10.0


class ChannelServer:
    """Every gateway connection of this worker; routes the batchers' output to the connection
    whose call it is."""

    def __init__(self, worker: WorkerState) -> None:
        self.worker = worker
        self.connections: set[Connection] = set()
        self.server: asyncio.Server | None = None
        worker.dispatch.on_results = self._results
        worker.dispatch.on_failure = self._failure
        worker.dispatch.on_dropped = self._dropped

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Connection(self), host, port, reuse_address=True)
        logger.info("channel on %s:%d", host, port)

    @property
    def in_flight(self) -> int:
        return sum(len(c.calls) for c in self.connections)

    async def close(self, grace_s: float) -> None:
        """Stop taking connections, let the calls in flight finish (at most `grace_s`), then close."""
        if self.server is not None:
            self.server.close()
        deadline = time.monotonic() + grace_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.close("the worker shut down")
        if self.server is not None:
            await self.server.wait_closed()

    def _results(self, results: StepResults) -> None:
        for job, result in results:
            job.owner.result(job, result)

    def _failure(self, jobs: list[Job], exc: Exception) -> None:
        for job in jobs:
            job.owner.fail(job.call, "worker_error", f"forward pass failed: {exc}", "error")

    def _dropped(self, job: Job) -> None:
        job.owner.dropped(job)


class Connection(asyncio.Protocol):
    def __init__(self, server: ChannelServer) -> None:
        self.server = server
        self.worker = server.worker
        self.metrics = server.worker.metrics
        self.reader = FrameReader(to_worker=True)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.welcomed = False
        self.closed = False
        self.calls: dict[int, Job] = {}
        self.last_call = 0
        self.models = list(self.worker.models.values())
        self.replied: set[int] = set()  # calls that have had a result (the fault delay is per call)
        self.garbage: dict[int, str] = {}  # calls answered with garbage at their first result
        self.held: dict[int, list[tuple[Result, bytes]]] = {}  # results held back by a fault delay
        self.outbox = Outbox(Step, self._send)
        self.hello_timer: asyncio.TimerHandle | None = None
        self.costs_version = 0  # the resolution report's versions this gateway has been told

    # connection events ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT_S, self._no_hello)
        self.server.connections.add(self)

    def _no_hello(self) -> None:
        if not self.welcomed:
            self.close(f"no HELLO within {HELLO_TIMEOUT_S:g} s")

    def data_received(self, data: bytes) -> None:
        try:
            for message, payload in self.reader.feed(data):
                if self.closed:
                    return
                self.metrics.frames_in.inc()
                self._handle(message, payload)
        except FrameError as exc:
            self.close(f"bad frame: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.hello_timer is not None:
            self.hello_timer.cancel()
        self.server.connections.discard(self)
        if self.welcomed:
            self.metrics.connections.dec()
        for call in list(self.calls):  # nobody will read them: never start their next step
            self._cancel(call)

    def close(self, reason: str) -> None:
        """Close with one log line naming the peer and the reason."""
        if self.closed:
            return
        self.closed = True
        logger.warning("channel from %s closed: %s", self.peer, reason)
        if self.transport is not None:
            self.transport.close()

    # gateway messages ----------------------------------------------------------------------------
    def _handle(self, message: Any, payload: memoryview) -> None:
        if not self.welcomed:
            if not isinstance(message, Hello):
                raise FrameError(f"{type(message).__name__} before HELLO")
            self._hello(message)
        elif isinstance(message, Work):
            self._work(message, payload)
        elif isinstance(message, Ping):
            draining = self.worker.drain.is_set()
            self._send(Pong(message.seq, not draining, "draining" if draining else "", self._resolutions_changed()))
        else:
            raise FrameError(f"unexpected {type(message).__name__}")

    def _hello(self, hello: Hello) -> None:
        secret = self.worker.settings.shared_secret
        if hello.version != VERSION:
            reason = f"protocol version {hello.version}, this worker speaks {VERSION}"
        elif secret is not None and not hmac.compare_digest(hello.secret.encode(), secret.get_secret_value().encode()):
            reason = "wrong shared secret"
        else:
            reason = ""
        if reason:
            self._send(Refuse(reason))
            self.close(f"HELLO refused ({reason}) from {hello.peer!r}")
            return
        if self.hello_timer is not None:
            self.hello_timer.cancel()
        self.welcomed = True
        self.metrics.connections.inc()
        spec = self.worker.spec
        self._send(
            Welcome(
                VERSION,
                self.worker.identity,
                list(self.worker.models),
                spec.input.size,
                spec.classes,
                self.worker.settings.max_request_batch,
                [served.warm_ms for served in self.worker.models.values()],
                self._resolutions(),
            )
        )

    def _resolutions(self) -> list[dict[str, Any]]:
        self.costs_version = sum(served.batcher.costs.version for served in self.models)
        return [served.batcher.costs.report() for served in self.models]

    def _resolutions_changed(self) -> list[dict[str, Any]] | None:
        """The resolution report when it has changed since this connection last had it."""
        if sum(served.batcher.costs.version for served in self.models) == self.costs_version:
            return None
        return self._resolutions()

    def _work(self, work: Work, payload: memoryview) -> None:
        images = tensors(payload, [(s.rows, self.worker.spec.input.size) for s in work.submits]) if work.submits else []
        if not work.submits and len(payload):
            raise FrameError(f"{len(payload)} payload bytes without a submit")
        for submit, rows in zip(work.submits, images, strict=True):
            if submit.call <= self.last_call:
                raise FrameError(f"call id {submit.call} is not above the last one ({self.last_call})")
            self.last_call = submit.call
            self._submit(submit, rows)
        for call in work.cancels:
            if call in self.calls:
                self._cancel(call)

    def _submit(self, submit: Submit, rows: np.ndarray) -> None:
        problem = self._check(submit)
        if problem:
            self.fail(submit.call, "bad_request", problem, "bad_request")
            return
        verdict = self.worker.faults.verdict() if self.worker.faults else Verdict.SERVE
        if verdict is Verdict.ERROR:
            self.fail(submit.call, "injected", "injected fault", "injected_error")
            return
        if verdict is Verdict.GARBAGE:
            self.garbage[submit.call] = self.worker.settings.faults.garbage_kind
        served = self.models[submit.model]
        images = torch.from_numpy(rows.reshape(submit.rows, *self.worker.spec.input.shape).copy())
        expires = None if submit.time_left_ms is None else time.monotonic() + submit.time_left_ms / 1000
        job = Job(
            images,
            submit.start,
            submit.final_only,
            submit.stop_margin,
            expires,
            self,
            submit.call,
            coarse=submit.coarse,
        )
        self.calls[submit.call] = job
        self.metrics.in_flight.inc()
        served.batcher.submit(job)

    def _check(self, submit: Submit) -> str:
        if not 0 <= submit.model < len(self.models):
            return f"model index {submit.model}: this worker serves {[s.name for s in self.models]}"
        last = self.models[submit.model].engine.plan.resolutions - 1
        if submit.rows > self.worker.settings.max_request_batch:
            return f"{submit.rows} rows: at most {self.worker.settings.max_request_batch} per call"
        if not 0 <= submit.start <= last:
            return f"start resolution {submit.start} is not in 0..{last}"
        margin = submit.stop_margin
        if margin is not None and not 0 < margin <= 1:
            return f"stop_margin must be in (0, 1], got {margin!r}"
        if submit.time_left_ms is not None and not submit.time_left_ms > 0:
            return f"time_left_ms must be positive, got {submit.time_left_ms!r}"
        return ""

    # results -------------------------------------------------------------------------------------
    def _end(self, call: int, outcome: str) -> Job:
        job = self.calls.pop(call)
        self.metrics.in_flight.dec()
        self.metrics.outcome[outcome].inc()
        self.replied.discard(call)
        self.garbage.pop(call, None)
        return job

    def _cancel(self, call: int) -> None:
        """Nobody needs the call any more: its next step is never started, held results never sent."""
        self._end(call, "cancelled").cancelled = True
        self.held.pop(call, None)

    def result(self, job: Job, result: StepResult) -> None:
        """A step's result for one of this connection's calls (on the event loop)."""
        if self.calls.get(job.call) is not job or job.cancelled:
            return  # cancelled while its step ran
        call = job.call
        last = result.final or result.stopped
        kind = self.garbage.get(call)
        if kind is not None:
            self._end(call, "garbage")
            self._garbage(call, result, kind)
            return
        entry = Result(
            call,
            result.index,
            result.planes,
            result.final,
            result.stopped,
            job.rows,
            result.probs.shape[1],
            result.slower,
        )
        data = np.ascontiguousarray(result.probs, dtype=FLOAT).tobytes()
        delay = self._delay_s(call)
        if last:
            self._end(call, "ok" if result.final else "stopped")
        if delay > 0 or call in self.held:
            self._hold(call, entry, data, delay)
            return
        self._queue(entry, data)

    def _delay_s(self, call: int) -> float:
        """The fault delay before this result: the sampled one and any pause window before a call's
        first result, pause windows only before its later ones."""
        faults = self.worker.faults
        if faults is None:
            return 0.0
        first = call not in self.replied
        self.replied.add(call)
        return (faults.sample_delay_s() if first else 0.0) + faults.pause_remaining_s()

    def _hold(self, call: int, entry: Result, data: bytes, delay: float) -> None:
        held = self.held.get(call)
        if held is None:
            held = self.held[call] = []
            asyncio.get_running_loop().call_later(delay, self._release, call, held)
        held.append((entry, data))

    def _release(self, call: int, held: list[tuple[Result, bytes]]) -> None:
        if self.held.get(call) is not held:
            return  # cancelled meanwhile: nobody reads it
        del self.held[call]
        for entry, data in held:
            self._queue(entry, data)

    def _garbage(self, call: int, result: StepResult, kind: str) -> None:
        rows, classes = result.probs.shape
        if kind == "nan":
            self._queue(
                Result(call, result.index, result.planes, True, False, rows, classes),
                b"\xff\xff\xc0\x7f" * (rows * classes),
            )
        elif kind == "shape":
            probs = np.ascontiguousarray(result.probs[:, :3], dtype=FLOAT)
            self._queue(Result(call, result.index, result.planes, True, False, rows, probs.shape[1]), probs.tobytes())
        elif self.transport is not None:  # the frame is broken, as a broken peer's would be
            self.outbox.flush()
            short = b"".join(
                encode(Step([Result(call, result.index, None, True, False, rows, classes)], []), [b"\0" * 8])
            )
            if kind == "truncated":  # its payload ends before its entries do
                self.transport.write(short)
            else:  # close: the connection breaks off in the middle of a frame
                self.transport.write(short[: len(short) // 2])
                self.transport.abort()
            self.metrics.frames_out.inc()

    def fail(self, call: int, kind: str, message: str, outcome: str) -> None:
        if call in self.calls:
            self._end(call, outcome)
        else:
            self.metrics.outcome[outcome].inc()
        self.outbox.put_other(Failure(call, kind, message[:500]))

    def dropped(self, job: Job) -> None:
        """The batcher dropped a job before its next step: past its deadline (a cancelled one has
        already been ended)."""
        if self.calls.get(job.call) is job:
            self._end(job.call, "expired")

    # sending -------------------------------------------------------------------------------------
    def _queue(self, entry: Result, data: bytes) -> None:
        self.outbox.put(entry, data)

    def _send(self, message: Any, payload: list[bytes | memoryview] | None = None) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.writelines(encode(message, payload))
        self.metrics.frames_out.inc()
