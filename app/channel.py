"""The gateway's end of one worker channel (protocol/channel.py): one persistent connection to one
worker process, multiplexing every call the gateway makes to it.

Calls and cancels made during one event-loop tick go out in one `Work` frame (flushed with
`call_soon`: no timer, so nothing waits for it); each `Step` frame that comes back carries every
result of a computed step, handed to each call's sink as it is read. Nothing here creates a task
per call: the connection is an asyncio Protocol and its timers are loop timers.

The connection is usable once the worker's `Welcome` has arrived and its identity matches the
gateway's bundle (`check`); it is pinged every health interval, and a worker that stops answering
pings (SIGSTOP) counts as not ready after a few misses, though calls still go to it (the patience
and the coded replica deal with a slow one). A lost connection fails its calls in flight at once
(`ReplicaError` "connection": they are decoded) and is re-dialled by its endpoint (app/replicas.py).
A frame that breaks the protocol closes the connection with one log line naming the peer and the
reason; only that connection's calls are affected.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from app.errors import ReplicaError
from protocol.channel import (
    VERSION,
    FrameError,
    FrameReader,
    Hello,
    Outbox,
    Ping,
    Pong,
    Refuse,
    Step,
    Submit,
    Welcome,
    Work,
    encode,
    tensors,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepAnswer:
    """One call's result at one resolution, checked: probabilities (B, C) float64."""

    probs: np.ndarray
    resolution: int
    final: bool
    stopped: bool
    slower: bool = False  # a coarse resolution asked for explicitly, measured no cheaper than float32


class CallSink(Protocol):
    def answered(self, call: Call, answer: StepAnswer) -> None: ...

    def failed(self, call: Call, error: ReplicaError) -> None: ...


@dataclass(eq=False, slots=True)
class Call:
    """One replica call: its id on its connection, whom it reports to, and what it is for."""

    replica: str  # the replica it went to (a member, a coded model, or the hedging replica)
    member: str  # the model it asks for (the member a hedged call stands in for)
    rows: int
    sink: CallSink
    started: float = 0.0  # time.perf_counter() when it was made
    id: int = 0
    channel: WorkerChannel | None = None
    done: bool = False  # its last answer or its failure has been delivered, or it was cancelled
    answers: int = 0


@dataclass
class Options:
    """What a call asks of the worker (protocol.channel.Submit)."""

    start: int = 0
    final_only: bool = True
    stop_margin: float | None = None
    time_left_ms: float | None = None
    coarse: bool = False  # every coarse resolution, even those the worker skips as no cheaper (issue 31)


@dataclass
class ChannelConfig:
    secret: str
    peer: str  # who we are, for the worker's log
    classes: int
    resolutions: int
    check: Callable[[Welcome], str | None]  # why a welcome is not acceptable, or None
    timeout_s: float  # connect + welcome
    ping_timeout_s: float  # a ping not answered within this is missed
    max_frame_bytes: int


class WorkerChannel(asyncio.Protocol):
    def __init__(self, name: str, address: tuple[str, int], config: ChannelConfig) -> None:
        self.name, self.address, self.config = name, address, config
        self.reader = FrameReader(to_worker=False, max_frame_bytes=config.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.welcome: Welcome | None = None
        self.welcomed: asyncio.Future[Welcome] = asyncio.get_running_loop().create_future()
        self.welcomed.add_done_callback(_retrieve)  # nobody may be waiting any more when it fails
        self.models: dict[str, int] = {}
        self.calls: dict[int, Call] = {}
        self.last_id = 0
        self.closed = False
        self.why_closed = ""
        self.outbox = Outbox(Work, self._write)
        self.ready = True  # the worker's own word in its last Pong (False while it drains)
        self.resolutions: dict[str, dict[str, Any]] = {}  # model → its live resolutions and costs, as measured
        self.on_resolutions: Callable[[WorkerChannel], None] = lambda channel: None
        self.missed = 0  # pings in a row without an answer in time
        self.ping_seq = 0
        self.pong_seq = 0
        self.on_lost: Callable[[WorkerChannel], None] = lambda channel: None
        self.on_health: Callable[[WorkerChannel], None] = lambda channel: None

    @property
    def peer(self) -> str:
        return f"{self.name} at {self.address[0]}:{self.address[1]}"

    @property
    def in_flight(self) -> int:
        return len(self.calls)

    @property
    def usable(self) -> bool:
        return self.welcome is not None and not self.closed

    # connection events ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._write(Hello(VERSION, self.config.secret, self.config.peer))

    def data_received(self, data: bytes) -> None:
        try:
            for message, payload in self.reader.feed(data):
                if self.closed:
                    return
                self._handle(message, payload)
        except FrameError as exc:
            self.close(f"bad frame: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.why_closed = f"connection lost: {exc or 'closed by the worker'}"
            if self.welcome is not None:
                logger.warning("channel to %s lost: %s", self.peer, exc or "closed by the worker")
        if not self.welcomed.done():
            self.welcomed.set_exception(NotWelcomedError(self.why_closed))
        calls, self.calls = self.calls, {}
        for call in calls.values():  # in flight: they fail now (and are decoded), not at a time-out
            self._fail(call, ReplicaError(self.name, "connection", self.why_closed))
        self.on_lost(self)

    def close(self, reason: str, quiet: bool = False) -> None:
        """Close with one log line naming the peer and the reason (at INFO when `quiet`: an orderly
        close); calls in flight fail."""
        if self.closed:
            return
        self.closed = True
        self.why_closed = reason
        logger.log(logging.INFO if quiet else logging.WARNING, "channel to %s closed: %s", self.peer, reason)
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows, and fails the calls in flight

    # worker messages -----------------------------------------------------------------------------
    def _handle(self, message: Any, payload: memoryview) -> None:
        if isinstance(message, Step):
            self._step(message, payload)
        elif isinstance(message, Pong):
            if message.seq > self.pong_seq:
                self.pong_seq, self.missed = message.seq, 0
            self.ready = message.ready
            if message.resolutions is not None and self.welcome is not None:
                self.resolutions = dict(zip(self.welcome.models, message.resolutions, strict=False))
                self.on_resolutions(self)
            self.on_health(self)
        elif isinstance(message, Welcome):
            self._welcome(message)
        elif isinstance(message, Refuse):
            self.close(f"the worker refused the HELLO: {message.reason}")
        else:
            raise FrameError(f"unexpected {type(message).__name__}")

    def _welcome(self, welcome: Welcome) -> None:
        if self.welcome is not None:
            raise FrameError("a second WELCOME")
        problem = self.config.check(welcome)
        if problem is not None:
            if not self.welcomed.done():
                self.welcomed.set_exception(IdentityError(problem))
            self.close(problem)
            return
        self.welcome = welcome
        self.models = {name: i for i, name in enumerate(welcome.models)}
        self.resolutions = dict(zip(welcome.models, welcome.resolutions, strict=False))
        if not self.welcomed.done():
            self.welcomed.set_result(welcome)

    def _step(self, step: Step, payload: memoryview) -> None:
        if step.results:
            for entry in step.results:
                if entry.call > self.last_id:
                    raise FrameError(f"a result for call {entry.call}, which was never sent")
            arrays = tensors(payload, [(r.rows, r.classes) for r in step.results])
        elif len(payload):
            raise FrameError(f"{len(payload)} payload bytes without a result")
        else:
            arrays = []
        for entry, probs in zip(step.results, arrays, strict=True):
            call = self.calls.get(entry.call)
            if call is None:
                continue  # cancelled, or ended: its answer is no longer wanted
            problem = self._problem(call, entry.rows, entry.classes, entry.resolution, probs)
            if problem:
                del self.calls[entry.call]
                self._fail(call, ReplicaError(self.name, "garbage", problem))
                continue
            last = entry.final or entry.stopped
            if last:
                del self.calls[entry.call]
                call.done = True
            call.answers += 1
            answer = StepAnswer(probs.astype(np.float64), entry.resolution, entry.final, entry.stopped, entry.slower)
            call.sink.answered(call, answer)
        for failure in step.failures:
            if failure.call > self.last_id:
                raise FrameError(f"a failure for call {failure.call}, which was never sent")
            call = self.calls.pop(failure.call, None)
            if call is not None:
                self._fail(call, ReplicaError(self.name, failure.kind, failure.message[:200]))

    def _problem(self, call: Call, rows: int, classes: int, resolution: int, probs: np.ndarray) -> str:
        if rows != call.rows or classes != self.config.classes:
            return f"an answer of shape [{rows}, {classes}], expected [{call.rows}, {self.config.classes}]"
        if not 0 <= resolution < self.config.resolutions:
            return f"resolution {resolution} is not in the plan"
        if not math.isfinite(float(probs.sum())):  # NaN and infinities survive a sum of probabilities
            return "an answer with values that are not finite"
        return ""

    @staticmethod
    def _fail(call: Call, error: ReplicaError) -> None:
        if not call.done:
            call.done = True
            call.sink.failed(call, error)

    # calls ---------------------------------------------------------------------------------------
    def submit(self, call: Call, images: bytes, options: Options) -> None:
        """Send a call (in this tick's frame); its answers and failure go to `call.sink`."""
        model = self.models.get(call.member)
        if model is None:
            raise ReplicaError(self.name, "worker_error", f"the worker does not serve {call.member!r}")
        self.last_id += 1
        call.id, call.channel = self.last_id, self
        self.calls[call.id] = call
        submit = Submit(
            call.id,
            model,
            call.rows,
            options.start,
            options.final_only,
            options.stop_margin,
            options.time_left_ms,
            options.coarse,
        )
        self.outbox.put(submit, images)

    def cancel(self, call: Call) -> None:
        """The call's answer is no longer needed: the worker never starts its next step."""
        call.done = True
        if self.calls.pop(call.id, None) is not None and not self.closed:
            self.outbox.put_other(call.id)

    def ping(self) -> None:
        """Ask for a Pong; if none comes within the ping time-out, that is one more missed ping."""
        if self.closed or self.welcome is None:
            return
        self.ping_seq += 1
        self._write(Ping(self.ping_seq))
        asyncio.get_running_loop().call_later(self.config.ping_timeout_s, self._ping_due, self.ping_seq)

    def _ping_due(self, seq: int) -> None:
        if not self.closed and self.pong_seq < seq:
            self.missed += 1
            self.on_health(self)

    def _write(self, message: Any, payload: list[bytes | memoryview] | None = None) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(encode(message, payload))


def _retrieve(future: asyncio.Future[Welcome]) -> None:
    if not future.cancelled():
        future.exception()


class IdentityError(Exception):
    """The worker serves another bundle, model or plan than the gateway's."""


class NotWelcomedError(Exception):
    """The connection ended before the worker's WELCOME (it refused the HELLO, or went away)."""


async def dial(name: str, address: tuple[str, int], config: ChannelConfig) -> WorkerChannel:
    """Connect, say HELLO and wait for an acceptable WELCOME (OSError, TimeoutError, NotWelcomedError
    or IdentityError otherwise)."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    _, channel = await asyncio.wait_for(
        loop.create_connection(lambda: WorkerChannel(name, address, config), *address), config.timeout_s
    )
    try:
        left = max(0.01, config.timeout_s - (time.monotonic() - started))
        await asyncio.wait_for(asyncio.shield(channel.welcomed), left)
    except BaseException:
        channel.close("no WELCOME in time", quiet=True)
        raise
    return channel


@dataclass
class Backoff:
    """Waits between re-dials of one endpoint: doubling from `initial_s` up to `max_s`."""

    initial_s: float = 0.1
    max_s: float = 10.0
    next_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.next_s = self.initial_s

    def delay_s(self) -> float:
        delay = self.next_s
        self.next_s = min(self.next_s * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self.next_s = self.initial_s
