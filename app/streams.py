"""Retention for `/v1/requests/{id}/events`: each request's events, replayable after `Last-Event-ID`.

Bounded in time (`retention_s` after the request ends) and in count (`retention_max` streams, the
oldest finished one is dropped first; when every retained stream is still running, new requests
are refused with 503 rather than growing without bound).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class RetainedStream:
    events: list[bytes] = field(default_factory=list)  # formatted SSE events; events[i] has id i + 1
    done: bool = False
    finished_at: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def append(self, event: bytes, last: bool) -> None:
        self.events.append(event)
        if last:
            self.done = True
            self.finished_at = time.monotonic()
        self.changed.set()

    async def follow(self, after: int, keepalive_s: float) -> AsyncIterator[bytes | None]:
        """Events with id > `after`, then live ones until the last; None means 'send a keep-alive'."""
        sent = after
        while True:
            while sent < len(self.events):
                sent += 1
                yield self.events[sent - 1]
            if self.done:
                return
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), keepalive_s)
            except TimeoutError:
                yield None


class StreamRegistry:
    def __init__(self, retention_s: float, retention_max: int) -> None:
        self.retention_s = retention_s
        self.retention_max = retention_max
        self.streams: OrderedDict[str, RetainedStream] = OrderedDict()

    def create(self, request_id: str) -> RetainedStream | None:
        """A new stream, or None when full of running requests."""
        self.expire()
        if len(self.streams) >= self.retention_max:
            finished = next((k for k, s in self.streams.items() if s.done), None)
            if finished is None:
                return None
            del self.streams[finished]
        stream = self.streams[request_id] = RetainedStream()
        return stream

    def get(self, request_id: str) -> RetainedStream | None:
        self.expire()
        return self.streams.get(request_id)

    def expire(self) -> None:
        cutoff = time.monotonic() - self.retention_s
        for key in [k for k, s in self.streams.items() if s.done and s.finished_at < cutoff]:
            del self.streams[key]

    async def close(self) -> None:
        tasks = [s.task for s in self.streams.values() if s.task is not None and not s.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
