"""Replica health checks: what one check concludes (against real loopback sockets), and when a ready
replica is taken out of service (missed checks in a row, or at once on a refusal or a "not ready")."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable

import pytest

from app.group import Group
from app.metrics import GatewayMetrics
from app.replicas import ReplicaHealth
from app.settings import GatewaySettings
from app.upstream import ReplicaClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _reply(status: str, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    writer.close()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:  # accepts, never answers: a SIGSTOPped process looks like this
        await asyncio.sleep(5)
    finally:
        writer.close()


async def _probe(handler: Handler) -> str:
    """One health check against a loopback server running `handler`."""
    tasks: list[asyncio.Task[None]] = []

    def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.ensure_future(handler(reader, writer)))

    server = await asyncio.start_server(track, "127.0.0.1", 0)
    client = ReplicaClient(GatewaySettings())
    try:
        return await client.ready(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout_s=0.3)
    finally:
        await client.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        server.close()
        await server.wait_closed()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (lambda r, w: _reply("200 OK", b'{"ready": true}', r, w), "ready"),
        (lambda r, w: _reply("200 OK", b'{"ready": false}', r, w), "down"),
        (lambda r, w: _reply("503 Service Unavailable", b'{"ready": false, "error": "draining"}', r, w), "down"),
        (lambda r, w: _reply("200 OK", b"not json", r, w), "missed"),
        (_silent, "missed"),
    ],
    ids=["ready", "says-not-ready", "draining-503", "garbage", "silent"],
)
async def test_one_check_concludes_ready_down_or_missed(handler: Handler, expected: str):
    assert await _probe(handler) == expected


@pytest.mark.anyio
async def test_a_refused_connection_is_down_not_missed():
    client = ReplicaClient(GatewaySettings())
    try:
        assert await client.ready(f"http://127.0.0.1:{_closed_port()}", timeout_s=0.3) == "down"
    finally:
        await client.close()


def _health(threshold: int) -> ReplicaHealth:
    urls = {"m0": "http://127.0.0.1:1", "m1": "http://127.0.0.1:2", "c": "http://127.0.0.1:3"}
    group = Group("g", ["m0", "m1"], {"c": 0}, None, 2, [4, None], 10, [], urls)
    client = ReplicaClient(GatewaySettings(health_failure_threshold=threshold))
    health = ReplicaHealth(group, client, GatewayMetrics(), threading.Event())
    for name in urls:
        health._record(name, "ready")
    return health


def test_a_ready_replica_stays_in_until_it_misses_threshold_checks_in_a_row():
    health = _health(threshold=3)
    assert health._record("m0", "missed") and health._record("m0", "missed")
    assert health.ready["m0"] and health.is_ready()
    health._record("m0", "ready")  # an answer resets the count
    assert health._record("m0", "missed") and health._record("m0", "missed")
    assert not health._record("m0", "missed")
    assert not health.ready["m0"] and health.is_ready()  # the coded replica covers one member
    assert not health._record("m0", "missed")  # a down replica stays down on a miss
    assert health._record("m0", "ready") and health.ready["m0"]


def test_a_refusal_or_not_ready_answer_takes_a_replica_out_at_once():
    health = _health(threshold=3)
    assert not health._record("m1", "down")
    assert not health.ready["m1"]
    health._record("c", "down")
    assert not health.is_ready()  # a member down and no coded replica to decode it


def test_a_threshold_of_one_takes_a_replica_out_on_its_first_miss():
    health = _health(threshold=1)
    assert not health._record("m0", "missed")
