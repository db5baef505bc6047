"""A request is one owned task writing one event log (DESIGN §2).

`Lifecycle.start` creates the task that owns everything about one admitted request: the fan-out,
the deadline (counted from arrival), decoding, early stop, and every cancellation. It appends each
update to the request's event log and ends the log with exactly one terminal event (`final` or
`error`) however the run ends: answered, failed, cancelled because the client went away, or
cancelled because the gateway shuts down. It also gives back the request's admission slot and
records the request's metrics, in this one place. The surfaces only read the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import orjson

from app.admission import Slot
from app.eventlog import Event, EventLog
from app.fanout import Options, Update
from app.sse import response_body

if TYPE_CHECKING:
    from app.state import Gateway

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
    endpoint: str  # the metrics label: infer | infer_stream | requests
    slot: Slot  # its admission slot, given back with the terminal event


@dataclass
class Owned:
    """A running request as its surfaces see it: its log, and a way to cancel it."""

    log: EventLog
    task: asyncio.Task[None] | None = None
    reason: str = SHUTDOWN
    seq: int = 0  # the last seq appended
    first_ms: float | None = None  # elapsed at the first complete answer
    events: list[str] = field(default_factory=list)

    def cancel(self, reason: str) -> None:
        if self.task is not None and not self.task.done():
            self.reason = reason
            self.task.cancel()


class Lifecycle:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.running: set[asyncio.Task[None]] = set()

    def start(self, log: EventLog, request: Admitted) -> Owned:
        owned = Owned(log)
        owned.task = task = asyncio.create_task(self._own(owned, request), name=f"request-{request.request_id or '-'}")
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return owned

    async def _own(self, owned: Owned, request: Admitted) -> None:
        images, options, arrival, request_id = request.images, request.options, request.arrival, request.request_id
        endpoint, slot = request.endpoint, request.slot
        gw = self.gw

        async def emit(update: Update) -> None:
            if owned.first_ms is None:
                owned.first_ms = update.elapsed_ms
            await self._append(owned, update, request_id)

        terminal: Update | None = None
        try:
            terminal = await gw.fanout.execute(images, options, arrival, emit, request_id)
        except asyncio.CancelledError:
            terminal = self._error(owned, arrival, owned.reason, 503)
            raise
        except Exception:
            logger.exception("request %s failed", request_id)
            terminal = self._error(owned, arrival, "internal error", 500)
        finally:
            try:
                if terminal is not None:
                    await self._append(owned, terminal, request_id)
            finally:
                slot.release()
                if terminal is not None:
                    self._record(endpoint, terminal, owned, options, arrival)

    def _error(self, owned: Owned, arrival: float, message: str, status: int) -> Update:
        elapsed = round((time.perf_counter() - arrival) * 1000, 3)
        return Update("error", owned.seq + 1, elapsed, error=message, status=status)

    async def _append(self, owned: Owned, update: Update, request_id: str | None) -> None:
        data = orjson.dumps(response_body(update, self.gw.group, request_id))
        owned.seq = update.seq
        owned.events.append(update.event)
        await owned.log.append(Event(update.seq, update.event, update.status, data, update))

    def _record(self, endpoint: str, update: Update, owned: Owned, options: Options, arrival: float) -> None:
        """Metrics of a finished request: outcome, times, decoded members, approximate finals."""
        m = self.gw.metrics
        if update.event == "error" and update.error == CLIENT_GONE:
            outcome = "client_gone"
        else:
            outcome = update.event if update.event != "error" else f"error_{update.status}"
        m.requests.labels(endpoint, outcome).inc()
        if options.deadline_ms is not None:
            overrun = (time.perf_counter() - arrival) - options.deadline_ms / 1000
            m.deadline_overrun.observe(max(overrun, 0.0))
        if update.event != "final":
            return
        first = owned.first_ms if owned.first_ms is not None else update.elapsed_ms
        m.time_to_coarse.observe(first / 1000)
        m.time_to_final.observe(update.elapsed_ms / 1000)
        decoded = update.decoded_members()
        for member in decoded:
            m.decoded.labels(member).inc()
        low = update.resolution < self.gw.group.resolutions - 1
        if decoded or low:
            m.approximate.labels("low_resolution" if low else "decoded").inc()
        self.gw.fanout.activity.final(decoded, approximate=bool(decoded or low))

    async def close(self) -> None:
        """At shutdown: every running request ends with one `error` ("the gateway shut down")."""
        tasks = list(self.running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
