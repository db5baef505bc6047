"""The gateway's channels to its workers (app/channel.py, app/replicas.py) against scripted workers
on loopback that speak the channel protocol: the HELLO and identity check (DESIGN §3), pings and
readiness, a lost connection, broken frames, one channel per resolved address and the balancing
between them. The real worker's end is tested in tests/workers/test_channel.py and end to end in
tests/integration."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import numpy as np
import pytest

from app.channel import Call, Options, StepAnswer
from app.errors import ReplicaError
from app.group import Group
from app.metrics import GatewayMetrics
from app.replicas import HEDGE, Replicas, identity_mismatch
from app.settings import GatewaySettings
from protocol.channel import (
    FLOAT,
    VERSION,
    FrameReader,
    Hello,
    Ping,
    Pong,
    Refuse,
    Result,
    Step,
    Welcome,
    Work,
    encode,
)
from protocol.spec import InputSpec, ModelSpec

SHA = "a" * 64  # the gateway's bundle manifest
OTHER_SHA = "b" * 64
CLASSES = 10


def _spec(classes: int = CLASSES) -> ModelSpec:
    return ModelSpec("g", InputSpec("input", (1, 28, 28)), classes, ())


def _identity(model: str | list[str] = "m0", sha: str = SHA, planes: list[int] | None = None) -> dict:
    return {"bundle_sha256": sha, "model": model, "refinement": [4] if planes is None else planes}


def _group(urls: dict[str, str], hedge_url: str | None = None) -> Group:
    return Group("g", ["m0", "m1"], {"c": 0}, None, 2, [4, None], _spec(), urls, hedge_url, manifest_sha256=SHA)


class FakeWorker:
    """A worker as the channel sees one: answers a HELLO with `identity`, each submit with a float32
    result after `delay_s` (unless `silent`), pings unless `deaf`; `refuse` refuses every HELLO."""

    def __init__(self, identity: dict | None = None, delay_s: float = 0.0) -> None:
        self.identity = identity or _identity()
        self.delay_s = delay_s
        self.silent = self.deaf = False
        self.draining = False
        self.refuse = ""
        self.submits: list[int] = []
        self.cancels: list[int] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> FakeWorker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        frames = FrameReader(to_worker=True)
        try:
            while data := await reader.read(65536):
                for message, _payload in frames.feed(data):
                    self._handle(message, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def _handle(self, message: Any, writer: asyncio.StreamWriter) -> None:
        if isinstance(message, Hello):
            if self.refuse:
                writer.write(b"".join(encode(Refuse(self.refuse))))
                writer.close()
                return
            model = self.identity.get("model", "m0")
            models = model if isinstance(model, list) else [model]
            writer.writelines(encode(Welcome(VERSION, self.identity, models, 784, CLASSES, 64)))
        elif isinstance(message, Ping) and not self.deaf:
            writer.writelines(encode(Pong(message.seq, not self.draining, "draining" if self.draining else "")))
        elif isinstance(message, Work):
            self.cancels += message.cancels
            for submit in message.submits:
                self.submits.append(submit.call)
                if not self.silent:
                    asyncio.get_running_loop().call_later(self.delay_s, self._answer, writer, submit.call, submit.rows)

    def _answer(self, writer: asyncio.StreamWriter, call: int, rows: int) -> None:
        if call in self.cancels or writer.is_closing():
            return
        probs = np.full((rows, CLASSES), 0.1, FLOAT)
        writer.writelines(encode(Step([Result(call, 1, None, True, False, rows, CLASSES)], []), [probs.tobytes()]))

    def send_raw(self, data: bytes) -> None:
        for writer in self.writers:
            writer.write(data)

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class Sink:
    def __init__(self) -> None:
        self.answers: list[StepAnswer] = []
        self.errors: list[ReplicaError] = []
        self.done = asyncio.Event()

    def answered(self, call: Call, answer: StepAnswer) -> None:
        self.answers.append(answer)
        self.done.set()

    def failed(self, call: Call, error: ReplicaError) -> None:
        self.errors.append(error)
        self.done.set()


FAST = {"health_interval_s": 0.05, "health_timeout_s": 0.05, "health_backoff_max_s": 0.2, "connect_timeout_s": 1.0}


async def _replicas(workers: dict[str, FakeWorker], threshold: int = 3, **settings: Any) -> Replicas:
    urls = {name: f"tcp://127.0.0.1:{w.port}" for name, w in workers.items()}
    group = _group({n: u for n, u in urls.items() if n != HEDGE}, urls.get(HEDGE))
    config = GatewaySettings(health_failure_threshold=threshold, **{**FAST, **settings})
    replicas = Replicas(group, config, GatewayMetrics(), threading.Event())
    await replicas.start()
    return replicas


async def _until(condition: Any, timeout_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def _call(replicas: Replicas, name: str, sink: Sink) -> Call:
    channel = replicas.pick(name)
    assert channel is not None
    call = Call(name, name, 1, sink)
    channel.submit(call, np.zeros((1, 784), FLOAT).tobytes(), Options())
    return call


@pytest.fixture
async def trio():
    workers = {n: await FakeWorker(_identity(n)).start() for n in ("m0", "m1", "c")}
    yield workers
    for worker in workers.values():
        await worker.stop()


@pytest.mark.anyio
async def test_replicas_that_welcome_with_the_gateways_identity_are_ready_and_answer(trio):
    replicas = await _replicas(trio)
    try:
        await _until(replicas.is_ready)
        assert replicas.ready == {"m0": True, "m1": True, "c": True} and replicas.skipped == set()
        sink = Sink()
        _call(replicas, "m1", sink)
        await asyncio.wait_for(sink.done.wait(), 2)
        assert [a.final for a in sink.answers] == [True] and sink.answers[0].probs.shape == (1, CLASSES)
    finally:
        await replicas.stop()


@pytest.mark.anyio
async def test_a_replica_of_another_bundle_is_skipped_counted_and_logged_once(trio, caplog):
    caplog.set_level(logging.WARNING, logger="app.replicas")
    trio["m1"].identity = _identity("m1", OTHER_SHA)
    replicas = await _replicas(trio)
    try:
        reason = "identity mismatch: bundle sha256 bbbbbbbbbbbb… != aaaaaaaaaaaa… (the gateway's)"
        await _until(lambda: _count(replicas, "m1") >= 3)  # re-dialled with back-off, refused each time
        assert replicas.skipped == {"m1"} and replicas.reasons() == {"m1": reason} and replicas.is_ready()
        assert replicas.mismatched == {"m1": reason}
        mismatch_lines = [r.getMessage() for r in caplog.records if "is not used" in r.getMessage()]
        assert mismatch_lines == [f"replica m1 (127.0.0.1:{trio['m1'].port}) is not used: {reason}"]
        trio["m1"].identity = _identity("m1")  # the rolling update completes
        await _until(lambda: replicas.ready["m1"])
        assert replicas.skipped == set() and replicas.mismatched == {}
    finally:
        await replicas.stop()


def _count(replicas: Replicas, name: str) -> float:
    value = replicas.metrics.registry.get_sample_value("coinserve_replica_identity_mismatch_total", {"replica": name})
    return value or 0.0


@pytest.mark.anyio
async def test_a_worker_that_refuses_the_hello_is_not_used_and_says_why(trio):
    trio["c"].refuse = "wrong shared secret"
    replicas = await _replicas(trio)
    try:
        assert replicas.skipped == {"c"} and replicas.unreachable == {"c"}
        assert replicas.reasons()["c"] == "the worker refused the HELLO: wrong shared secret"
    finally:
        await replicas.stop()


@pytest.mark.anyio
async def test_a_lost_connection_fails_its_calls_at_once_and_is_dialled_again(trio):
    trio["m0"].silent = True
    replicas = await _replicas(trio)
    try:
        sink = Sink()
        _call(replicas, "m0", sink)
        await _until(lambda: trio["m0"].submits)
        for writer in trio["m0"].writers:  # the worker goes away (killed)
            writer.transport.abort()
        await asyncio.wait_for(sink.done.wait(), 2)
        assert [e.kind for e in sink.errors] == ["connection"] and sink.answers == []
        assert "m0" in replicas.skipped or replicas.ready["m0"]  # skipped until it is connected again
        await _until(lambda: replicas.ready["m0"] and "m0" not in replicas.skipped)
        trio["m0"].silent = False
        again = Sink()
        _call(replicas, "m0", again)
        await asyncio.wait_for(again.done.wait(), 2)
        assert again.answers and again.errors == []
    finally:
        await replicas.stop()


@pytest.mark.anyio
async def test_missed_pings_make_a_replica_not_ready_but_calls_still_go_to_it(trio):
    replicas = await _replicas(trio, threshold=2)
    try:
        await _until(lambda: replicas.ready["m0"])
        trio["m0"].deaf = True  # SIGSTOP: the connection stays open, nothing answers
        await _until(lambda: not replicas.ready["m0"])
        assert replicas.reasons()["m0"].startswith("missed ") and "no answer to a ping" in replicas.reasons()["m0"]
        assert replicas.skipped == set() and replicas.pick("m0") is not None and replicas.is_ready()
        assert replicas.unresponsive == {"m0"}  # requests do not wait for its answers (app/fanout.py)
        trio["m0"].deaf = False
        await _until(lambda: replicas.ready["m0"])
        assert replicas.unresponsive == set()
    finally:
        await replicas.stop()


@pytest.mark.anyio
async def test_a_draining_worker_is_not_ready(trio):
    replicas = await _replicas(trio)
    try:
        trio["m1"].draining = True
        await _until(lambda: not replicas.ready["m1"])
        assert replicas.reasons() == {"m1": "draining: shutting down"}
        assert replicas.unresponsive == set()  # it still answers what it has
    finally:
        await replicas.stop()


@pytest.mark.anyio
async def test_a_result_for_a_call_never_sent_closes_the_channel_and_fails_its_calls_once(trio, caplog):
    caplog.set_level(logging.WARNING, logger="app.channel")
    trio["m1"].silent = True
    replicas = await _replicas(trio)
    try:
        sink = Sink()
        _call(replicas, "m1", sink)
        await _until(lambda: trio["m1"].submits)
        probs = np.zeros((1, CLASSES), FLOAT).tobytes()
        trio["m1"].send_raw(b"".join(encode(Step([Result(99, 1, None, True, False, 1, CLASSES)], []), [probs])))
        await asyncio.wait_for(sink.done.wait(), 2)
        await asyncio.sleep(0.05)
        assert [e.kind for e in sink.errors] == ["connection"]
        closed = [r.getMessage() for r in caplog.records if "closed" in r.getMessage()]
        where = f"m1 at 127.0.0.1:{trio['m1'].port}"
        assert closed == [f"channel to {where} closed: bad frame: a result for call 99, which was never sent"]
        assert replicas.replicas["m0"].connected  # the other channels go on
    finally:
        await replicas.stop()


@pytest.mark.anyio
async def test_an_answer_of_the_wrong_shape_fails_only_that_call(trio):
    trio["m0"].silent = True
    replicas = await _replicas(trio)
    try:
        sink = Sink()
        _call(replicas, "m0", sink)
        await _until(lambda: trio["m0"].submits)
        call = trio["m0"].submits[0]
        three = np.zeros((1, 3), FLOAT).tobytes()
        trio["m0"].send_raw(b"".join(encode(Step([Result(call, 1, None, True, False, 1, 3)], []), [three])))
        await asyncio.wait_for(sink.done.wait(), 2)
        assert [(e.kind, e.detail) for e in sink.errors] == [("garbage", "an answer of shape [1, 3], expected [1, 10]")]
        assert replicas.replicas["m0"].connected
    finally:
        await replicas.stop()


@pytest.mark.anyio
async def test_every_resolved_address_gets_a_channel_and_calls_go_to_the_shortest_queue():
    """A member behind a headless Service: one channel per pod, calls balanced by the gateway's own
    queue lengths; a pod added by a scale-up takes calls once resolved, a removed one is retired."""
    pods = [await FakeWorker(_identity("m0"), delay_s=0.2).start() for _ in range(3)]
    others = {n: await FakeWorker(_identity(n)).start() for n in ("m1", "c")}
    resolved = [("127.0.0.1", pods[0].port), ("127.0.0.1", pods[1].port)]

    async def resolver(host: str, port: int) -> list[tuple[str, int]]:
        return list(resolved) if host == "pods.test" else [(host, port)]

    group = _group({"m0": "tcp://pods.test:1", **{n: f"tcp://127.0.0.1:{w.port}" for n, w in others.items()}})
    replicas = Replicas(group, GatewaySettings(**FAST), GatewayMetrics(), threading.Event(), resolver)
    await replicas.start()
    try:
        await _until(lambda: sum(e["connected"] for e in replicas.endpoints("m0")) == 2)
        sinks = [Sink() for _ in range(6)]
        for sink in sinks:
            _call(replicas, "m0", sink)
        assert [len(p.submits) for p in pods[:2]] == [0, 0]  # not flushed yet: one frame per tick
        await _until(lambda: sum(len(p.submits) for p in pods) == 6)
        assert [len(p.submits) for p in pods] == [3, 3, 0]
        resolved.append(("127.0.0.1", pods[2].port))  # scale-up
        await _until(lambda: sum(e["connected"] for e in replicas.endpoints("m0")) == 3)
        for sink in [Sink() for _ in range(3)]:
            _call(replicas, "m0", sink)
        await _until(lambda: sum(len(p.submits) for p in pods) == 9)
        assert len(pods[2].submits) == 3  # the new pod has the shortest queue
        del resolved[0]  # scale-down: retired once idle
        await _until(lambda: len(replicas.endpoints("m0")) == 2, timeout_s=5)
    finally:
        await replicas.stop()
        for worker in [*pods, *others.values()]:
            await worker.stop()


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


@pytest.mark.parametrize(
    "address", ["http://127.0.0.1:8101", "tcp://127.0.0.1", "tcp://:80", "127.0.0.1:80", "tcp://h:1/x", "tcp://h:x"]
)
def test_a_replica_address_that_is_not_tcp_host_port_is_refused_with_the_form(address: str):
    from app.group import parse_address

    with pytest.raises(ValueError, match="must be tcp://HOST:PORT, the worker's channel port"):
        parse_address(address)
