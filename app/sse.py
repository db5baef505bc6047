"""Every byte of a server-sent-event stream is made here (DESIGN §2): `id:`/`event:`/`data:` blocks
from a request's log, the reconnection delay first, keep-alive comments while nothing happens.
The data of each event is its V2 response (app/responses.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from app.eventlog import Event, EventLog, follow
from app.group import Group
from app.responses import is_default, render
from protocol.v2 import InferRequest

KEEPALIVE = b": keep-alive\n\n"
RETRY_MS = 2000
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
MEDIA_TYPE = "text/event-stream"


def event_bytes(event: Event) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.name.encode(), event.data)


def preamble() -> bytes:
    """Sent first on every stream: the browser's reconnection delay."""
    return b"retry: %d\n\n" % RETRY_MS


async def events(
    log: EventLog, after: int, keepalive_s: float, group: Group, request: InferRequest | None = None
) -> AsyncIterator[bytes]:
    """The log as SSE bytes from `after` to its terminal event, with keep-alive comments while
    nothing happens; only the outputs `request` asked for, when it named some."""
    yield preamble()
    async for event in follow(log, after, keepalive_s):
        if event is None:
            yield KEEPALIVE
        elif request is None or is_default(request):
            yield event_bytes(event)
        else:
            data, _, _ = render(event, request, group)
            yield event_bytes(Event(event.seq, event.name, event.status, data))
