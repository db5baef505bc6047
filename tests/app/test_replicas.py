"""Replica health checks: what one check concludes (against real loopback sockets), when a ready
replica is taken out of service (missed checks in a row, or at once on a refusal or a "not ready"),
and the identity check that keeps out a replica from another bundle, model or plan (DESIGN §3)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import threading
from collections.abc import Awaitable, Callable

import pytest

from app.group import Group
from app.metrics import GatewayMetrics
from app.replicas import HEDGE, ReplicaHealth, identity_mismatch
from app.settings import GatewaySettings
from app.upstream import Probe, ReplicaClient
from protocol.spec import InputSpec, ModelSpec

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
SHA = "a" * 64  # the gateway's bundle manifest
OTHER_SHA = "b" * 64


def _spec(classes: int, labels: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec("g", InputSpec("input", (1, 28, 28)), classes, labels)


def _identity(model: str | list[str] = "m0", sha: str = SHA, planes: list[int] | None = None) -> dict:
    return {"bundle_sha256": sha, "model": model, "refinement": [4] if planes is None else planes}


READY = Probe("ready", _identity())
MISSED = Probe("missed", detail="no readiness answer within 1 s")
DOWN = Probe("down", detail="it says it is not ready")


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


async def _probe(handler: Handler) -> Probe:
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
        (lambda r, w: _reply("200 OK", b'{"ready": true}', r, w), Probe("ready")),
        (lambda r, w: _reply("200 OK", b'{"ready": false}', r, w), Probe("down", detail="it says it is not ready")),
        (
            lambda r, w: _reply("503 Service Unavailable", b'{"ready": false, "error": "draining"}', r, w),
            Probe("down", detail='http_503: {"ready": false, "error": "draining"}'),
        ),
        (
            lambda r, w: _reply("200 OK", b"not json", r, w),
            Probe("missed", detail="its readiness answer is not a JSON object"),
        ),
        (_silent, Probe("missed", detail="no readiness answer within 0.3 s")),
    ],
    ids=["ready-without-identity", "says-not-ready", "draining-503", "garbage", "silent"],
)
async def test_one_check_concludes_ready_down_or_missed(handler: Handler, expected: Probe):
    assert await _probe(handler) == expected


@pytest.mark.anyio
async def test_a_ready_answer_brings_the_identity_the_replica_reports():
    body = json.dumps({"ready": True, "identity": _identity("m1", OTHER_SHA, [2, 4])}).encode()
    assert await _probe(lambda r, w: _reply("200 OK", body, r, w)) == Probe("ready", _identity("m1", OTHER_SHA, [2, 4]))


@pytest.mark.anyio
async def test_a_refused_connection_is_down_not_missed():
    client = ReplicaClient(GatewaySettings())
    try:
        probe = await client.ready(f"http://127.0.0.1:{_closed_port()}", timeout_s=0.3)
    finally:
        await client.close()
    assert probe.outcome == "down" and probe.detail.startswith("unreachable: cannot connect: ")


def _group(urls: dict[str, str], hedge_url: str | None = None) -> Group:
    return Group("g", ["m0", "m1"], {"c": 0}, None, 2, [4, None], _spec(10), urls, hedge_url, manifest_sha256=SHA)


def _health(threshold: int = 3, hedge: bool = False) -> ReplicaHealth:
    urls = {"m0": "http://127.0.0.1:1", "m1": "http://127.0.0.1:2", "c": "http://127.0.0.1:3"}
    group = _group(urls, "http://127.0.0.1:4" if hedge else None)
    client = ReplicaClient(GatewaySettings(health_failure_threshold=threshold))
    health = ReplicaHealth(group, client, GatewayMetrics(), threading.Event())
    for name in health.ready:
        health._record(name, Probe("ready", _identity(["m0", "m1"] if name == HEDGE else name)))
    return health


def test_a_ready_replica_stays_in_until_it_misses_threshold_checks_in_a_row():
    health = _health(threshold=3)
    assert health._record("m0", MISSED) and health._record("m0", MISSED)
    assert health.ready["m0"] and health.is_ready()
    health._record("m0", READY)  # an answer resets the count
    assert health._record("m0", MISSED) and health._record("m0", MISSED)
    assert not health._record("m0", MISSED)
    assert not health.ready["m0"] and health.is_ready()  # the coded replica covers one member
    assert not health._record("m0", MISSED)  # a down replica stays down on a miss
    assert health._record("m0", READY) and health.ready["m0"]


def test_a_refusal_or_not_ready_answer_takes_a_replica_out_at_once():
    health = _health(threshold=3)
    assert not health._record("m1", DOWN)
    assert not health.ready["m1"]
    health._record("c", DOWN)
    assert not health.is_ready()  # a member down and no coded replica to decode it


def test_a_threshold_of_one_takes_a_replica_out_on_its_first_miss():
    health = _health(threshold=1)
    assert not health._record("m0", MISSED)


def test_a_replica_missing_threshold_checks_gives_that_as_its_reason():
    health = _health(threshold=2)
    health._record("m0", MISSED)
    assert health.reasons() == {}
    health._record("m0", MISSED)
    assert health.reasons() == {"m0": "missed 2 health checks in a row (last: no readiness answer within 1 s)"}


@pytest.mark.parametrize(
    ("name", "reported", "expected"),
    [
        ("m0", _identity("m0"), None),
        (
            "m0",
            _identity("m0", OTHER_SHA),
            "identity mismatch: bundle sha256 bbbbbbbbbbbb… != aaaaaaaaaaaa… (the gateway's)",
        ),
        ("m0", _identity("m1"), "identity mismatch: serves 'm1', not 'm0'"),
        ("m0", _identity(["m1", "m0"]), None),
        ("m0", _identity("m0", planes=[2, 4]), "identity mismatch: refinement planes [2, 4] != [4] (the gateway's)"),
        (HEDGE, _identity(["m0", "m1"]), None),
        (HEDGE, _identity("m0"), "identity mismatch: serves 'm0', not ['m0', 'm1']"),
        (
            "c",
            {"model": "c"},
            "identity mismatch: bundle sha256 None != aaaaaaaaaaaa… (the gateway's); "
            "refinement planes None != [4] (the gateway's)",
        ),
        ("c", "c", "identity mismatch: not an identity object: c"),
    ],
    ids=["same", "other-bundle", "other-model", "serves-more", "other-plan", "hedge", "hedge-short", "partial", "junk"],
)
def test_identity_mismatch_names_every_difference(name: str, reported: object, expected: str | None):
    assert identity_mismatch(_group({}), name, reported) == expected


def _samples(health: ReplicaHealth, name: str) -> float | None:
    return health.metrics.registry.get_sample_value("coinserve_replica_identity_mismatch_total", {"replica": name})


def test_a_replica_of_another_bundle_is_down_skipped_counted_and_logged_once(caplog: pytest.LogCaptureFixture):
    health = _health()
    caplog.set_level(logging.WARNING, logger="app.replicas")
    for _ in range(3):
        assert not health._record("m1", Probe("ready", _identity("m1", OTHER_SHA)))
    reason = "identity mismatch: bundle sha256 bbbbbbbbbbbb… != aaaaaaaaaaaa… (the gateway's)"
    assert not health.ready["m1"] and health.is_ready()  # the coded replica decodes m1
    assert health.skipped == {"m1"} and health.reasons() == {"m1": reason}
    assert _samples(health, "m1") == 3
    assert [r.getMessage() for r in caplog.records] == [f"replica m1 is not used: {reason}", "replica m1 is NOT ready"]


def test_a_mismatched_replica_stays_skipped_until_it_reports_the_gateways_identity():
    health = _health()
    health._record("m1", Probe("ready", _identity("m0")))
    health._record("m1", MISSED)  # a check that sees no identity proves nothing
    health._record("m1", DOWN)
    assert health.skipped == {"m1"} and health.reasons() == {"m1": "identity mismatch: serves 'm0', not 'm1'"}
    assert health._record("m1", Probe("ready", _identity("m1")))
    assert health.skipped == set() and health.reasons() == {} and health.mismatched == {}


def test_skipped_joins_open_circuits_and_mismatches_but_leaves_the_hedge_to_its_own_flag():
    health = _health(hedge=True)
    health.mark_unreachable("m0")
    health._record("c", Probe("ready", _identity("c", planes=[3])))
    health._record(HEDGE, Probe("ready", _identity("m0")))
    assert health.skipped == {"m0", "c"} and not health.is_hedge_usable
    assert health.reasons() == {
        "m0": "a request could not connect: waiting for a health check",
        "c": "identity mismatch: refinement planes [3] != [4] (the gateway's)",
        HEDGE: "identity mismatch: serves 'm0', not ['m0', 'm1']",
    }


def test_a_replica_that_reports_no_identity_is_used_with_one_warning(caplog: pytest.LogCaptureFixture):
    health = _health()
    caplog.set_level(logging.WARNING, logger="app.replicas")
    assert health._record("m0", Probe("ready")) and health._record("m0", Probe("ready"))
    assert health.skipped == set() and _samples(health, "m0") is None
    assert [r.getMessage() for r in caplog.records] == [
        "replica m0 reports no identity (an older build): used unverified"
    ]


@pytest.mark.anyio
async def test_check_all_keeps_out_a_real_replica_that_reports_another_bundle():
    bodies = {
        "m0": {"ready": True, "identity": _identity("m0")},
        "m1": {"ready": True, "identity": _identity("m1", OTHER_SHA)},
        "c": {"ready": True, "identity": _identity("c")},
    }
    servers = [
        await asyncio.start_server(functools.partial(_reply, "200 OK", json.dumps(b).encode()), "127.0.0.1", 0)
        for b in bodies.values()
    ]
    urls = {n: f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for n, s in zip(bodies, servers, strict=True)}
    client = ReplicaClient(GatewaySettings())
    health = ReplicaHealth(_group(urls), client, GatewayMetrics(), threading.Event())
    try:
        await health.check_all()
    finally:
        await client.close()
        for server in servers:
            server.close()
            await server.wait_closed()
    assert health.ready == {"m0": True, "m1": False, "c": True} and health.skipped == {"m1"}
