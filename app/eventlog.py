"""A request's event log: what every surface reads (JSON, SSE, `/v1/requests/{id}/events`).

One owned task appends `coarse`/`refined`/`final`/`error` events to its request's log and ends it
with exactly one terminal event; readers follow the log from a sequence number (`Last-Event-ID`).
The interface is small (create/get a log; append, read-from-seq, wait; expire) so that a shared
store can implement it; `MemoryStore` is the default for one gateway process.

Retention is bounded in time (`retention_s` after a request ends) and in count (`retention_max`
logs; the oldest finished one is dropped first; when every retained log is still running, new
requests are refused rather than growing without bound).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

TERMINAL = ("final", "error")


@dataclass(frozen=True)
class Event:
    """One event of a request: its sequence number (the SSE id, from 1), name, the HTTP status a
    JSON caller gets if this is its answer, and the V2 response (or `{"error": ...}`) as JSON."""

    seq: int
    name: str  # coarse | refined | final | error
    status: int
    data: bytes
    # The `Update` it was rendered from, kept by in-process logs only (never stored or sent): a
    # surface that answers other than with `data` (binary tensors, chosen outputs, gRPC) renders it
    # again without parsing `data`; a shared store leaves it None and the surface parses `data`.
    update: Any = field(default=None, compare=False, repr=False)

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL


class EventLog(Protocol):
    """One request's events, in order; ends with exactly one terminal event."""

    @property
    def done(self) -> bool: ...

    @property
    def last_seq(self) -> int: ...

    async def append(self, event: Event) -> None: ...

    async def read(self, after: int) -> list[Event]: ...

    async def wait(self, after: int, timeout_s: float) -> list[Event]:
        """Events with seq > `after`, waiting up to `timeout_s` for one if there is none yet."""
        ...


class LogStore(Protocol):
    async def create(self, request_id: str) -> EventLog | None:
        """A new, empty log; None when the store is full of running requests."""
        ...

    async def get(self, request_id: str) -> EventLog | None: ...

    async def expire(self) -> None: ...


class LogGoneError(Exception):
    """A shared log was removed while a reader followed it (retention, the count cap, a store restart)."""


async def follow(log: EventLog, after: int, keepalive_s: float) -> AsyncIterator[Event | None]:
    """Events with seq > `after`, then live ones until the terminal one; None means 'no event for
    `keepalive_s`: send a keep-alive'. Waits happen in the caller's task (no timeout crosses tasks).
    It also ends, without a terminal event, when there is nothing more to read: the log is complete
    and `after` is past its end, or a shared log was removed meanwhile."""
    seen = after
    while True:
        try:
            events = await log.wait(seen, keepalive_s)
        except LogGoneError:
            return
        if not events:
            if log.done and seen >= log.last_seq:
                return
            yield None
            continue
        for event in events:
            seen = event.seq
            yield event
            if event.terminal:
                return


async def terminal(log: EventLog) -> Event:
    """Wait for the log's terminal event."""
    async for event in follow(log, 0, 3600.0):
        if event is not None and event.terminal:
            return event
    raise RuntimeError("event log ended without a terminal event")


@dataclass
class MemoryLog:
    events: list[Event] = field(default_factory=list)
    finished_at: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].terminal

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    async def append(self, event: Event) -> None:
        self.append_now(event)

    def append_now(self, event: Event) -> None:
        if self.done:
            raise RuntimeError(f"event {event.name} appended after the terminal event")
        if event.seq != self.last_seq + 1:
            raise RuntimeError(f"event seq {event.seq} does not follow {self.last_seq}")
        self.events.append(event)
        if event.terminal:
            self.finished_at = time.monotonic()
        self.changed.set()
        self.changed = asyncio.Event()  # waiters hold the old one; new waiters wait for the next append

    async def read(self, after: int) -> list[Event]:
        return self.events[after:] if after >= 0 else list(self.events)

    async def wait(self, after: int, timeout_s: float) -> list[Event]:
        if after < self.last_seq or self.done:
            return self.events[after:]
        changed = self.changed
        try:
            await asyncio.wait_for(changed.wait(), timeout_s)
        except TimeoutError:
            return []
        return self.events[after:]


class MemoryStore:
    """The in-process store: logs live in this gateway's memory."""

    def __init__(self, retention_s: float, retention_max: int) -> None:
        self.retention_s = retention_s
        self.retention_max = retention_max
        self.logs: OrderedDict[str, MemoryLog] = OrderedDict()

    async def create(self, request_id: str) -> MemoryLog | None:
        return self.create_now(request_id)

    def create_now(self, request_id: str) -> MemoryLog | None:
        self.expire_now()
        if len(self.logs) >= self.retention_max:
            finished = next((k for k, log in self.logs.items() if log.done), None)
            if finished is None:
                return None
            del self.logs[finished]
        log = self.logs[request_id] = MemoryLog()
        return log

    async def get(self, request_id: str) -> MemoryLog | None:
        self.expire_now()
        return self.logs.get(request_id)

    async def expire(self) -> None:
        self.expire_now()

    def expire_now(self) -> None:
        cutoff = time.monotonic() - self.retention_s
        for key in [k for k, log in self.logs.items() if log.done and log.finished_at < cutoff]:
            del self.logs[key]
