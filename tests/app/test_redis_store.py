"""What only the shared store does (the common contract is in test_eventlog.py): leases, orphans
ended exactly once, another gateway's logs, and Redis away. A real redis-server throughout."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.eventlog import Event, follow
from app.redis_store import GATEWAY_LOST, RedisLog, RedisStore, StoreUnavailableError
from bench.redis_server import RedisServer


def _event(seq: int, name: str = "coarse") -> Event:
    return Event(seq, name, 200, b'{"seq": %d}' % seq)


async def _store(url: str, lease_s: float = 0.5) -> RedisStore:
    store = RedisStore(url, retention_s=60, retention_max=100, lease_s=lease_s)
    await store.start()
    return store


@pytest.mark.anyio
async def test_another_gateway_reads_and_follows_the_same_log(redis_url):
    a, b = await _store(redis_url), await _store(redis_url)
    try:
        log = await a.create("r1")
        assert log is not None
        await log.append(_event(1))
        seen = await b.get("r1")
        assert seen is not None and seen.last_seq == 1 and not seen.done
        reader = asyncio.create_task(_collect(follow(seen, 0, keepalive_s=5)))
        await log.append(_event(2, "refined"))
        await log.append(_event(3, "final"))
        assert [e.seq for e in await reader] == [1, 2, 3]
        assert (await b.get("r1")).done  # type: ignore[union-attr]
        with pytest.raises(KeyError):
            await b.create("r1")
    finally:
        await a.close()
        await b.close()


async def _collect(events) -> list[Event]:
    return [e async for e in events if e is not None]


@pytest.mark.anyio
async def test_a_live_owner_keeps_its_request_past_many_leases(redis_url):
    a, b = await _store(redis_url, lease_s=0.3), await _store(redis_url, lease_s=0.3)
    try:
        log = await a.create("r1")
        assert log is not None
        await asyncio.sleep(1.0)  # three leases: renewed by A every 0.1 s
        await b.sweep()
        assert not await b.end_if_orphaned("r1")
        await log.append(_event(1, "final"))
        assert [e.name for e in await (await b.get("r1")).read(0)] == ["final"]  # type: ignore[union-attr]
    finally:
        await a.close()
        await b.close()


@pytest.mark.anyio
async def test_an_orphan_is_ended_with_one_error_however_many_gateways_notice(redis_url):
    a = await _store(redis_url, lease_s=0.3)
    log = await a.create("r1")
    assert log is not None
    await log.append(_event(1))
    await a.close()  # A dies: nothing renews its lease any more
    others = [await _store(redis_url, lease_s=0.3) for _ in range(3)]
    try:
        readers = [await o.get("r1") for o in others]
        started = time.monotonic()
        followed = [asyncio.create_task(_collect(follow(r, 0, keepalive_s=5))) for r in readers if r is not None]
        claims = await asyncio.gather(*(o.end_if_orphaned("r1") for o in others for _ in range(5)))
        results = await asyncio.gather(*followed)
        assert time.monotonic() - started < 0.3 + 1.0
        assert sum(claims) <= 1  # the sweeps and the readers may have claimed it first
        for events in results:
            assert [(e.seq, e.name) for e in events] == [(1, "coarse"), (2, "error")]
            assert events[-1].status == 503 and GATEWAY_LOST.encode() in events[-1].data
        # The owner, had it been alive but cut off: its late events are dropped, the log stays ended.
        await RedisLog(others[0], "r1", last_seq=1).append(_event(2, "final"))
        assert [e.name for e in await readers[0].read(0)] == ["coarse", "error"]  # type: ignore[union-attr]
    finally:
        for o in others:
            await o.close()


@pytest.mark.anyio
async def test_redis_unreachable_refuses_new_logs_with_a_clear_reason():
    store = RedisStore("redis://127.0.0.1:9/0", retention_s=60, retention_max=10, lease_s=0.5)
    await store.start()
    try:
        assert not store.ok and not store.ever_ok and "Error" in store.reason
        with pytest.raises(StoreUnavailableError, match="stream store redis://127.0.0.1:9/0 unreachable"):
            await store.create("r1")
        with pytest.raises(StoreUnavailableError):
            await store.get("r1")
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_paused_redis_fails_fast_and_the_store_recovers_by_itself(redis_server: RedisServer, redis_url):
    store = await _store(redis_url)
    try:
        redis_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                await store.get("r1")
            assert time.monotonic() - started < 1.5
            await asyncio.sleep(1.2)
            assert not store.ok  # the periodic check noticed: new requests are refused at once
            with pytest.raises(StoreUnavailableError):
                await store.create("r1")
        finally:
            redis_server.resume()
        await asyncio.sleep(1.2)
        assert store.ok
        assert await store.create("r1") is not None
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_retried_append_that_already_landed_is_accepted_once(redis_url):
    """A command that timed out at the client may still run in Redis: its retry must not fail."""
    store = await _store(redis_url)
    try:
        assert await store.create("r1") is not None
        assert await store.create("r1") is not None  # the retried create of this gateway's own log
        event = _event(1)
        assert await store.append_script("r1", event, orphan=False) == "ok"
        assert await store.append_script("r1", event, orphan=False) == "ok"  # the retry
        assert await store.append_script("r1", Event(1, "coarse", 200, b"other"), orphan=False) == "seq"
        final = _event(2, "final")
        assert await store.append_script("r1", final, orphan=False) == "ok"
        assert await store.append_script("r1", final, orphan=False) == "ok"  # a retried terminal event
        assert [e.seq for e in await (await store.get("r1")).read(0)] == [1, 2]  # type: ignore[union-attr]
        other = await _store(redis_url)
        try:
            with pytest.raises(KeyError):  # another gateway's create of the same id is refused
                await other.create("r1")
        finally:
            await other.close()
    finally:
        await store.close()


@pytest.mark.anyio
async def test_an_owner_found_lost_drops_every_later_event_quietly(redis_url):
    a = await _store(redis_url, lease_s=0.3)
    log = await a.create("r1")
    assert log is not None
    a.owned.clear()  # A stops renewing (cut off, paused), but its request task goes on
    await asyncio.sleep(0.5)
    b = await _store(redis_url, lease_s=0.3)
    try:
        await b.end_if_orphaned("r1")  # if A's own sweep has not ended it already
        for event in (_event(1), _event(2, "refined"), _event(3, "final")):
            await log.append(event)  # dropped, never an exception into the request's task
        assert [e.name for e in await (await b.get("r1")).read(0)] == ["error"]  # type: ignore[union-attr]
    finally:
        await a.close()
        await b.close()


@pytest.mark.anyio
async def test_a_follower_ends_when_its_log_is_removed_under_it(redis_url):
    store = await _store(redis_url)
    try:
        log = await store.create("r1")
        assert log is not None
        await log.append(_event(1))
        reader = asyncio.create_task(_collect(follow(log, 0, keepalive_s=0.2)))
        await asyncio.sleep(0.1)
        await store.redis.delete(*(f"coinserve:r:r1:{part}" for part in ("meta", "events", "lease")))
        events = await asyncio.wait_for(reader, 3)  # not keep-alives forever
        assert [e.seq for e in events] == [1]
    finally:
        await store.close()
