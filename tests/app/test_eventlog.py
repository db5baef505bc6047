"""The event-log contract, on both stores: in-memory and Redis Streams (a real redis-server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from app.eventlog import Event, MemoryStore, follow, terminal
from app.redis_store import RedisStore
from app.sse import event_bytes


def _event(seq: int, name: str = "coarse") -> Event:
    return Event(seq, name, 200, b'{"seq": %d}' % seq)


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Any]]:
    """make_store(retention_s, retention_max) -> a started store of the parametrised kind."""
    made: list[RedisStore] = []

    async def make(retention_s: float = 60, retention_max: int = 10) -> Any:
        if request.param == "memory":
            return MemoryStore(retention_s, retention_max)
        store = RedisStore(request.getfixturevalue("redis_url"), retention_s, retention_max)
        await store.start()
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.mark.anyio
async def test_follow_replays_after_the_given_id_then_goes_live(make_store):
    store = await make_store(retention_s=60, retention_max=10)
    log = await store.create("r1")
    assert log is not None
    await log.append(_event(1))
    await log.append(_event(2, "refined"))

    async def finish() -> None:
        await asyncio.sleep(0.05)
        await log.append(_event(3, "final"))

    task = asyncio.create_task(finish())
    seen = [e.seq async for e in follow(log, after=1, keepalive_s=5) if e is not None]
    await task
    assert seen == [2, 3] and log.done and log.last_seq == 3


@pytest.mark.anyio
async def test_follow_yields_keepalives_while_waiting_and_stops_at_the_terminal_event(make_store):
    log = await (await make_store(60, 10)).create("r1")
    assert log is not None
    gen = follow(log, after=0, keepalive_s=0.01)
    assert await gen.__anext__() is None
    await log.append(_event(1, "error"))
    assert [e.name async for e in gen if e is not None] == ["error"]


@pytest.mark.anyio
async def test_terminal_waits_for_the_last_event_and_many_readers_see_it(make_store):
    log = await (await make_store(60, 10)).create("r1")
    assert log is not None
    readers = [asyncio.create_task(terminal(log)) for _ in range(3)]
    await asyncio.sleep(0)
    await log.append(_event(1))
    await log.append(_event(2, "final"))
    assert {(await r).seq for r in readers} == {2}


@pytest.mark.anyio
async def test_nothing_follows_the_terminal_event_and_seqs_are_consecutive(make_store):
    log = await (await make_store(60, 10)).create("r1")
    assert log is not None
    with pytest.raises(RuntimeError, match="does not follow"):
        await log.append(_event(2))
    await log.append(_event(1, "final"))
    with pytest.raises(RuntimeError, match="after the terminal"):
        await log.append(_event(2, "error"))


def test_sse_form_has_id_event_and_data():
    assert event_bytes(_event(7, "final")) == b'id: 7\nevent: final\ndata: {"seq": 7}\n\n'


@pytest.mark.anyio
async def test_retention_is_bounded_in_count_dropping_finished_logs_first(make_store):
    store = await make_store(retention_s=60, retention_max=2)
    first, second = await store.create("a"), await store.create("b")
    assert first is not None and second is not None
    assert await store.create("c") is None  # both still running: refuse rather than grow
    await first.append(_event(1, "final"))
    assert await store.create("c") is not None
    assert await store.get("a") is None
    b = await store.get("b")
    assert b is not None and not b.done


@pytest.mark.anyio
async def test_finished_logs_expire_after_the_retention_window(make_store):
    store = await make_store(retention_s=0.0, retention_max=5)
    log = await store.create("a")
    assert log is not None
    await log.append(_event(1, "final"))
    await asyncio.sleep(0.01)  # Redis's shortest TTL is 1 ms
    assert await store.get("a") is None


@pytest.mark.anyio
async def test_following_past_the_end_of_a_complete_log_ends_at_once(make_store):
    log = await (await make_store(60, 10)).create("r1")
    assert log is not None
    await log.append(_event(1, "final"))
    gen = follow(log, after=5, keepalive_s=5)
    assert [e async for e in gen] == []  # no keep-alive loop on a log that can say nothing more
