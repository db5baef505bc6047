"""A request is one owned run writing one event log (DESIGN §2).

`Lifecycle.start` starts the fan-out run (app/fanout.py) that owns everything about one admitted
request: the fan-out, the deadline (counted from arrival), decoding, early stop, and every
cancellation. Each update it reports is appended to the request's event log, and the log ends with
exactly one terminal event (`final` or `error`) however the run ends: answered, failed, cancelled
because the client went away, or because the gateway shuts down. The terminal event also gives back
the request's admission slot and records the request's metrics, in this one place. The surfaces
only read the log (or, for a JSON answer, the terminal event itself: `Owned.finished`).

An in-process log is appended to synchronously, from the run's callbacks: no task per request. A
shared log (Redis) is written by one chain of appends per request, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import orjson

from app.admission import Slot
from app.eventlog import Event, EventLog, MemoryLog
from app.fanout import Fanout, Run
from app.group import Group
from app.metrics import GatewayMetrics
from app.responses import response_body
from app.statistics import Statistics
from app.updates import Options, Update

logger = logging.getLogger(__name__)
CLIENT_GONE = "the client went away"
SHUTDOWN = "the gateway shut down"


@dataclass(frozen=True)
class Admitted:
    """What a surface hands over once a request is admitted and parsed."""

    images: np.ndarray
    options: Options
    arrival: float  # time.perf_counter() when the request arrived: the deadline counts from here
    request_id: str | None
    endpoint: str  # the metrics label: infer | infer_stream | requests | grpc | grpc_stream
    slot: Slot  # its admission slot, given back with the terminal event


@dataclass(eq=False)
class Owned:
    """A running request as its surfaces see it: its log, its terminal event once written, and a way
    to cancel it."""

    log: EventLog
    finished: asyncio.Future[Event]
    run: Run | None = None
    first_ms: float | None = None  # elapsed at the first complete answer
    events: list[str] = field(default_factory=list)
    writer: asyncio.Future[None] | None = None  # the last append to a shared log
    handed: float = 0.0  # time.perf_counter() when it was handed to the fan-out (app/statistics.py)

    def cancel(self, reason: str) -> None:
        if self.run is not None:
            self.run.cancel(reason)


class Lifecycle:
    def __init__(self, fanout: Fanout, group: Group, metrics: GatewayMetrics) -> None:
        self.fanout = fanout
        self.group = group
        self.metrics = metrics
        self.running: set[Owned] = set()
        self.writers: set[asyncio.Future[None]] = set()
        self._outcomes: dict[tuple[str, str], object] = {}
        self.statistics = Statistics()  # Triton's statistics extension (app/routes/triton.py)

    def start(self, log: EventLog, request: Admitted) -> Owned:
        owned = Owned(log, asyncio.get_running_loop().create_future(), handed=time.perf_counter())
        self.running.add(owned)

        def on_update(update: Update) -> None:
            if owned.first_ms is None:
                owned.first_ms = update.elapsed_ms
            self._append(owned, update, request.request_id)

        def on_end(update: Update) -> None:
            self._end(owned, request, update)

        owned.run = self.fanout.start(request.images, request.options, request.arrival, on_end, on_update)
        return owned

    def _end(self, owned: Owned, request: Admitted, update: Update) -> None:
        self.running.discard(owned)
        run, owned.run = owned.run, None  # it has ended: nothing to cancel, and no cycle to leave to the collector
        try:
            event = self._append(owned, update, request.request_id)
        finally:
            request.slot.release()
        if not owned.finished.done():
            owned.finished.set_result(event)
        try:
            self._count(request, update, owned, run)
            self._record(request, update, owned)
        except Exception:  # metrics must never cost a request its answer
            logger.exception("recording request %s", request.request_id)

    def _append(self, owned: Owned, update: Update, request_id: str | None) -> Event:
        data = orjson.dumps(response_body(update, self.group, request_id))
        event = Event(update.seq, update.event, update.status, data, update)
        owned.events.append(update.event)
        log = owned.log
        if isinstance(log, MemoryLog):
            log.append_now(event)
        else:
            owned.writer = self._chain(owned.writer, log, event)
        return event

    def _chain(self, previous: asyncio.Future[None] | None, log: EventLog, event: Event) -> asyncio.Future[None]:
        """Append to a shared log after the previous append of the same request (in order)."""

        async def write() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            try:
                await log.append(event)
            except Exception:
                logger.exception("appending event %d (%s) to a shared log", event.seq, event.name)

        writer = asyncio.ensure_future(write())
        self.writers.add(writer)
        writer.add_done_callback(self.writers.discard)
        return writer

    def _count(self, request: Admitted, update: Update, owned: Owned, run: Run | None) -> None:
        """Triton's statistics (app/statistics.py): the stages' stamps; a run that ended before it was
        returned (no call could go) has none of its own, and is a failure."""
        if update.event != "final":
            self.statistics.failed(request.arrival)
            return
        dispatched = run.dispatched if run is not None else owned.handed
        answered = request.arrival + update.elapsed_ms / 1000
        self.statistics.succeeded(request.arrival, owned.handed, dispatched, answered, len(request.images))

    def _record(self, request: Admitted, update: Update, owned: Owned) -> None:
        """Metrics of a finished request: outcome, times, decoded members, approximate finals."""
        m = self.metrics
        if update.event == "error" and update.error == CLIENT_GONE:
            outcome = "client_gone"
        else:
            outcome = update.event if update.event != "error" else f"error_{update.status}"
        counter = self._outcomes.get((request.endpoint, outcome))
        if counter is None:
            counter = self._outcomes[(request.endpoint, outcome)] = m.requests.labels(request.endpoint, outcome)
        counter.inc()  # type: ignore[attr-defined]
        if request.options.deadline_ms is not None:
            overrun = (time.perf_counter() - request.arrival) - request.options.deadline_ms / 1000
            m.deadline_overrun.observe(max(overrun, 0.0))
        if update.event != "final":
            return
        first = owned.first_ms if owned.first_ms is not None else update.elapsed_ms
        m.time_to_coarse.observe(first / 1000)
        m.time_to_final.observe(update.elapsed_ms / 1000)
        decoded = update.decoded_members()
        for member in decoded:
            m.decoded.labels(member).inc()
        low = update.resolution < self.group.resolutions - 1
        if decoded or low:
            m.approximate.labels("low_resolution" if low else "decoded").inc()
        self.fanout.activity.final(decoded, approximate=bool(decoded or low))

    async def close(self) -> None:
        """At shutdown: every running request ends with one `error` ("the gateway shut down"), and
        every append to a shared log is waited for."""
        for owned in list(self.running):
            owned.cancel(SHUTDOWN)
        if self.writers:
            await asyncio.gather(*self.writers, return_exceptions=True)
