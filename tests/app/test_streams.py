from __future__ import annotations

import asyncio

import pytest

from app.streams import StreamRegistry


@pytest.mark.anyio
async def test_follow_replays_after_the_given_id_then_goes_live():
    registry = StreamRegistry(retention_s=60, retention_max=10)
    stream = registry.create("r1")
    assert stream is not None
    stream.append(b"e1", last=False)
    stream.append(b"e2", last=False)

    async def finish() -> None:
        await asyncio.sleep(0.05)
        stream.append(b"e3", last=True)

    task = asyncio.create_task(finish())
    seen = [e async for e in stream.follow(after=1, keepalive_s=5)]
    await task
    assert seen == [b"e2", b"e3"]


@pytest.mark.anyio
async def test_follow_yields_keepalives_while_waiting():
    registry = StreamRegistry(retention_s=60, retention_max=10)
    stream = registry.create("r1")
    assert stream is not None
    gen = stream.follow(after=0, keepalive_s=0.01)
    assert await gen.__anext__() is None
    stream.append(b"x", last=True)
    assert [e async for e in gen] == [b"x"]


def test_retention_is_bounded_in_count_dropping_finished_streams_first():
    registry = StreamRegistry(retention_s=60, retention_max=2)
    first, second = registry.create("a"), registry.create("b")
    assert first is not None and second is not None
    assert registry.create("c") is None  # both still running: refuse rather than grow
    first.append(b"done", last=True)
    assert registry.create("c") is not None
    assert registry.get("a") is None and registry.get("b") is second


def test_finished_streams_expire_after_the_retention_window():
    registry = StreamRegistry(retention_s=0.0, retention_max=5)
    stream = registry.create("a")
    assert stream is not None
    stream.append(b"done", last=True)
    assert registry.get("a") is None
