"""Request event logs in Redis Streams: many gateways, one stream per request (issue 19, DESIGN §2).

With `COINSERVE_STREAM_STORE=redis://HOST:PORT/DB` every gateway writes its `/v1/requests` logs
here and any gateway serves `GET /v1/requests/{id}/events` from here: blocking reads (`XREAD
BLOCK`), resumption from any `Last-Event-ID`, keep-alives. Direct JSON and SSE calls keep their
in-process logs: they need no shared log and go on working while Redis is away.

Keys of request ID (one Redis, not Redis Cluster: the scripts touch keys they derive):

    coinserve:r:ID:events   stream; entry id "SEQ-0"; fields n (event name), s (HTTP status), d (JSON)
    coinserve:r:ID:meta     hash: owner, created (ms), last (seq), done ("0" running / "1" ended)
    coinserve:r:ID:lease    the owner's id, with a TTL of `lease_s`, renewed while the request runs
    coinserve:index         sorted set of retained IDs by creation time (the count cap)
    coinserve:running       set of IDs without a terminal event (what the orphan sweep looks at)

Every append is one Lua script: it refuses an event that does not follow the last seq or comes after
the terminal one, so nothing is written twice and nothing after the end. A request's log ends with
exactly one terminal event: its owner's, or, when the owner's lease expired first (the gateway died,
or was cut off from Redis for longer than the lease), one `error` ("gateway lost", status 503)
appended by the first gateway that notices, with the same check-and-append. A finished log is kept
`retention_s`; past `retention_max` logs the oldest finished one goes first, and when every retained
log is still running new requests are refused, as in the in-memory store.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError, RedisError, TimeoutError as RedisTimeoutError

from app.eventlog import Event, LogGoneError

logger = logging.getLogger(__name__)

PREFIX = "coinserve:r:"
INDEX = "coinserve:index"
RUNNING = "coinserve:running"
GATEWAY_LOST = "gateway lost"
POLL_S = 0.5  # longest single XREAD BLOCK: a reader checks its request's lease at least this often
COMMAND_CONNECTIONS = 256  # pooled connections for commands (appends, creates, sweeps)
READER_CONNECTIONS = 1024  # one per blocked follower at a time: above the gateway's MAX_OPEN_STREAMS (256)

# KEYS: meta, lease, index, running. ARGV: id, owner, lease_ms, now_ms, retention_max, prefix.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  -- A retry of this gateway's own create that reached Redis after its caller timed out.
  if redis.call('HGET', KEYS[1], 'owner') == ARGV[2] and redis.call('HGET', KEYS[1], 'last') == '0' then
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
    return 'ok'
  end
  return 'exists'
end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then
  local freed = false
  for _, rid in ipairs(redis.call('ZRANGE', KEYS[3], 0, 199)) do
    local done = redis.call('HGET', ARGV[6] .. rid .. ':meta', 'done')
    if not done then
      redis.call('ZREM', KEYS[3], rid)
      freed = true
    elseif done == '1' then
      redis.call('DEL', ARGV[6] .. rid .. ':meta', ARGV[6] .. rid .. ':events')
      redis.call('ZREM', KEYS[3], rid)
      freed = true
      break
    end
  end
  if (not freed) or redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then return 'full' end
end
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'created', ARGV[4], 'last', '0', 'done', '0')
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
return 'ok'
"""

# The one check-and-append. KEYS: meta, events, lease, running.
# ARGV: id, seq, name, status, data, terminal (1/0), retention_ms, orphan (1: only if the lease is gone).
_APPEND = """
local done = redis.call('HGET', KEYS[1], 'done')
if not done then return 'gone' end
local seq, last = tonumber(ARGV[2]), tonumber(redis.call('HGET', KEYS[1], 'last'))
if seq <= last then
  -- A retry of an append that reached Redis after its caller timed out: the same event is there.
  local entry = redis.call('XRANGE', KEYS[2], ARGV[2] .. '-0', ARGV[2] .. '-0')
  if #entry == 1 then
    local f = {}
    for i = 1, #entry[1][2], 2 do f[entry[1][2][i]] = entry[1][2][i + 1] end
    if f['n'] == ARGV[3] and f['d'] == ARGV[5] then return 'ok' end
  end
  if done == '1' then return 'done' end
  return 'seq'
end
if done == '1' then return 'done' end
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return 'owned' end
if seq ~= last + 1 then return 'seq' end
redis.call('XADD', KEYS[2], ARGV[2] .. '-0', 'n', ARGV[3], 's', ARGV[4], 'd', ARGV[5])
redis.call('HSET', KEYS[1], 'last', ARGV[2])
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[1], 'done', '1')
  redis.call('DEL', KEYS[3])
  redis.call('SREM', KEYS[4], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
end
return 'ok'
"""


class StoreUnavailableError(Exception):
    """Redis cannot be reached (or has not been yet): the caller answers 503 + Retry-After."""


def _keys(request_id: str) -> tuple[str, str, str]:
    base = PREFIX + request_id
    return base + ":meta", base + ":events", base + ":lease"


def _events(entries: Any) -> list[Event]:
    """Stream entries [(b"SEQ-0", {b"n": ..., b"s": ..., b"d": ...}), ...] as events."""
    return [
        Event(int(entry_id.split(b"-", 1)[0]), fields[b"n"].decode(), int(fields[b"s"]), fields[b"d"])
        for entry_id, fields in entries
    ]


class RedisLog:
    """One request's log in Redis. `done` and `last_seq` are what the last read saw."""

    def __init__(self, store: RedisStore, request_id: str, last_seq: int = 0, done: bool = False) -> None:
        self.store = store
        self.request_id = request_id
        self.meta, self.stream, self.lease = _keys(request_id)
        self._last_seq = last_seq
        self._done = done
        self._lost = False  # ended by another gateway while this one owned it: later appends are dropped

    @property
    def done(self) -> bool:
        return self._done

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def _saw(self, events: list[Event]) -> list[Event]:
        if events:
            self._last_seq = max(self._last_seq, events[-1].seq)
            self._done = self._done or events[-1].terminal
        return events

    async def append(self, event: Event) -> None:
        """The owner's append; retried while Redis is away, for at most the lease (then the request
        is someone else's to end: its lease runs out and the first gateway to notice ends it)."""
        if self._lost:
            return
        try:
            outcome = await self.store.retrying(lambda: self.store.append_script(self.request_id, event, orphan=False))
        finally:
            if event.terminal:
                self.store.owned.discard(self.request_id)
        if outcome == "ok":
            self._saw([event])
        elif outcome == "done" and not self._done:  # its lease expired while it ran: another gateway ended it
            self.store.owned.discard(self.request_id)
            self._done = self._lost = True
            logger.warning("request %s was ended as lost before its %s event", self.request_id, event.name)
        elif outcome == "done":
            raise RuntimeError(f"event {event.name} appended after the terminal event")
        elif outcome == "seq":
            raise RuntimeError(f"event seq {event.seq} does not follow {self._last_seq}")
        else:
            raise RuntimeError(f"event {event.name} (seq {event.seq}) of {self.request_id} refused: {outcome}")

    async def read(self, after: int) -> list[Event]:
        entries: Any = await self.store.redis.xrange(self.stream, min=f"({max(after, 0)}-0")
        return self._saw(_events(entries))

    async def wait(self, after: int, timeout_s: float) -> list[Event]:
        """Events with seq > `after`, blocking up to `timeout_s`. Between blocks of at most POLL_S the
        reader checks its request's owner: an expired lease without a terminal event is ended here.
        While Redis is away it returns nothing (the caller sends keep-alives) and tries again."""
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0:
            block_ms = max(1, int(min(left, POLL_S) * 1000))
            try:
                reply: Any = await self.store.blocking.xread({self.stream: f"{max(after, 0)}-0"}, block=block_ms)
                if reply:
                    return self._saw(_events(reply[0][1]))
                state: Any = await self.store.redis.hmget(self.meta, ["last", "done"])
                if state[0] is None:  # expired, evicted, or Redis lost its data: nothing more will come
                    raise LogGoneError(self.request_id)
                self._last_seq, self._done = int(state[0]), state[1] == b"1"
                if self._done and after >= self._last_seq:
                    return []
                if not self._done:
                    await self.store.end_if_orphaned(self.request_id, self._last_seq)
            except RedisError as exc:
                logger.debug("reading %s: %s", self.request_id, exc)
                await asyncio.sleep(min(POLL_S, max(end - time.monotonic(), 0)))
        return []


class RedisStore:
    """The shared store. `start()` connects and starts the lease renewal and the orphan sweep."""

    def __init__(
        self, url: str, retention_s: float, retention_max: int, lease_s: float = 3.0, timeout_s: float = 0.5
    ) -> None:
        self.url = url
        self.retention_s = retention_s
        self.retention_max = retention_max
        self.lease_s = lease_s
        self.owner = uuid.uuid4().hex  # this gateway process
        self.owned: set[str] = set()  # requests this gateway runs: their leases are renewed
        # Commands give up after `timeout_s` (a paused Redis must not hold a POST for long); the
        # blocking reads have their own connections, with room for a POLL_S block.
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, max_connections=COMMAND_CONNECTIONS
        )
        self.blocking = aioredis.Redis.from_url(
            url,
            socket_timeout=POLL_S + timeout_s + 1.0,
            socket_connect_timeout=timeout_s,
            max_connections=READER_CONNECTIONS,
        )
        self._create = self.redis.register_script(_CREATE)
        self._append = self.redis.register_script(_APPEND)
        self.ok = False  # Redis answered the last check
        self.ever_ok = False  # it has answered once: until then the gateway is not ready
        self.reason = "not checked yet"
        self._tasks: list[asyncio.Task[None]] = []

    def describe(self) -> str:
        """The URL without a password."""
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    async def start(self) -> None:
        await self.check()
        self._tasks = [
            asyncio.create_task(self._every(min(1.0, self.lease_s / 3), self._renew), name="stream-store-leases"),
            asyncio.create_task(self._every(min(1.0, self.lease_s / 2), self.sweep), name="stream-store-sweep"),
            asyncio.create_task(self._every(1.0, self.check), name="stream-store-check"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.redis.aclose()
        await self.blocking.aclose()

    async def check(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            if self.ok or self.reason == "not checked yet":
                logger.warning("stream store %s unreachable: %s", self.describe(), exc)
            self.ok, self.reason = False, f"{type(exc).__name__}: {exc}"
            return
        if not self.ok:
            logger.info("stream store %s reachable", self.describe())
        self.ok = self.ever_ok = True
        self.reason = "ok"

    async def _every(self, period_s: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await step()
            except (RedisError, OSError) as exc:
                logger.debug("stream store: %s", exc)

    async def _renew(self) -> None:
        if not self.owned:
            return
        lease_ms = int(self.lease_s * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in list(self.owned):
                pipe.pexpire(_keys(request_id)[2], lease_ms)
            await pipe.execute()

    async def sweep(self) -> None:
        """End every request whose owner's lease expired (its gateway died) with one error, and drop
        index entries whose logs have expired."""
        members: Any = await self.redis.smembers(RUNNING)
        running = [m.decode() for m in members]
        others = [r for r in running if r not in self.owned]
        if others:
            async with self.redis.pipeline(transaction=False) as pipe:
                for request_id in others:
                    pipe.exists(_keys(request_id)[2])
                leased = await pipe.execute()
            for request_id, alive in zip(others, leased, strict=True):
                if not alive:
                    await self.end_if_orphaned(request_id)

    async def retrying(self, call: Callable[[], Awaitable[str]]) -> str:
        """`call` until it reaches Redis, for at most the lease."""
        end = time.monotonic() + self.lease_s
        delay = 0.05
        while True:
            try:
                return await call()
            except (RedisConnectionError, RedisTimeoutError, OSError):  # not a refusal (e.g. OOM): that is final
                if time.monotonic() + delay > end:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def append_script(self, request_id: str, event: Event, orphan: bool) -> str:
        meta, stream, lease = _keys(request_id)
        args: list[Any] = [request_id, event.seq, event.name, event.status, event.data, int(event.terminal)]
        args += [max(1, int(self.retention_s * 1000)), int(orphan)]
        reply = await self._append(keys=[meta, stream, lease, RUNNING], args=args)
        return cast(bytes, reply).decode()

    async def end_if_orphaned(self, request_id: str, last: int | None = None) -> bool:
        """Append the `gateway lost` error if the request's lease has expired and it has no terminal
        event yet; exactly one gateway succeeds (the check and the append are one script). `last`:
        the log's last seq if the caller has just read it (the script refuses a stale one)."""
        if request_id in self.owned:
            return False
        if last is None:
            stored = await self.redis.hget(_keys(request_id)[0], "last")
            if stored is None:
                return False
            last = int(stored)
        data = orjson.dumps({"error": GATEWAY_LOST})
        outcome = await self.append_script(request_id, Event(last + 1, "error", 503, data), orphan=True)
        if outcome == "ok":
            logger.warning("request %s: its gateway's lease expired; ended with %r", request_id, GATEWAY_LOST)
            return True
        return False

    async def create(self, request_id: str) -> RedisLog | None:
        """A new log owned by this gateway; None when every retained log is still running; raises
        KeyError if the id exists, StoreUnavailableError when Redis cannot be reached."""
        if not self.ok:
            raise StoreUnavailableError(f"stream store {self.describe()} unreachable: {self.reason}")
        meta, _, lease = _keys(request_id)
        args: list[Any] = [request_id, self.owner, int(self.lease_s * 1000), int(time.time() * 1000)]
        args += [self.retention_max, PREFIX]
        try:
            reply = await self._create(keys=[meta, lease, INDEX, RUNNING], args=args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"stream store {self.describe()} unreachable: {exc}") from exc
        outcome = cast(bytes, reply).decode()
        if outcome == "full":
            return None
        if outcome == "exists":
            raise KeyError(request_id)
        self.owned.add(request_id)
        return RedisLog(self, request_id)

    async def get(self, request_id: str) -> RedisLog | None:
        meta, _, _ = _keys(request_id)
        try:
            state = await self.redis.hmget(meta, ["last", "done"])
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"stream store {self.describe()} unreachable: {exc}") from exc
        if state[0] is None:
            return None
        return RedisLog(self, request_id, last_seq=int(state[0]), done=state[1] == b"1")

    async def expire(self) -> None:
        """Redis expires finished logs itself (their TTL)."""
