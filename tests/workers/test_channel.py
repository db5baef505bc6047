"""The worker's end of the channel (workers/channel.py) with a real model (the tiny bundle), driven
over loopback by raw frames: nothing before a valid HELLO, one Step frame per computed step,
cancels that stop work before it starts, pings, fault knobs per call, and broken frames that close
one connection and nothing else."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from protocol.channel import (
    VERSION,
    Failure,
    FrameReader,
    Hello,
    Ping,
    Pong,
    Refuse,
    Step,
    Submit,
    Welcome,
    Work,
    encode,
    tensors,
)
from workers.batcher import Batcher
from workers.channel import ChannelServer, Connection
from workers.settings import FaultSettings, WorkerSettings
from workers.state import WorkerMetrics, WorkerState, load

SECRET = "s3cret"


class Peer:
    """A gateway as the worker sees one: raw frames over a socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames = FrameReader(to_worker=False)
        self.pending: list[tuple[Any, memoryview]] = []

    def send(self, message: Any, payload: list[bytes] | None = None) -> None:
        self.writer.writelines(encode(message, payload))

    async def next(self, timeout_s: float = 5.0) -> tuple[Any, memoryview]:
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), timeout_s)
            if not data:
                raise ConnectionError("closed")
            self.pending.extend(self.frames.feed(data))
        return self.pending.pop(0)

    async def closed(self, timeout_s: float = 5.0) -> bool:
        try:
            while True:
                await self.next(timeout_s)
        except ConnectionError:
            return True

    async def hello(self, secret: str = SECRET) -> Welcome:
        self.send(Hello(VERSION, secret, "test"))
        welcome, _ = await self.next()
        assert isinstance(welcome, Welcome)
        return welcome


@pytest.fixture(scope="module")
def worker_state(tiny_bundle_dir: Path) -> WorkerState:
    settings = WorkerSettings(bundle=tiny_bundle_dir, model="member-0", shared_secret=SECRET, max_wait_ms=20)
    return load(settings, WorkerMetrics())


async def _serve(state: WorkerState) -> tuple[ChannelServer, int]:
    """The channel over fresh batchers (each test has its own event loop)."""
    server = ChannelServer(state)
    for served in state.models.values():
        old = served.batcher
        served.batcher = Batcher(
            old.engine,
            old.max_batch,
            old.max_wait_s * 1000,
            on_results=state.dispatch.results,
            on_failure=state.dispatch.failure,
            on_compute=state.metrics.computed,
            on_dropped=state.dispatch.dropped,
        )
        await served.batcher.start()
    await server.start("127.0.0.1", 0)
    assert server.server is not None
    return server, int(server.server.sockets[0].getsockname()[1])


_OPEN: list[Peer] = []


async def _close_peers() -> None:
    while _OPEN:
        writer = _OPEN.pop().writer
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


@pytest.fixture
async def channel(worker_state: WorkerState) -> AsyncIterator[tuple[WorkerState, int]]:
    server, port = await _serve(worker_state)
    try:
        yield worker_state, port
    finally:
        await _close_peers()
        await server.close(grace_s=1.0)
        for served in worker_state.models.values():
            await served.batcher.stop()


async def _peer(port: int) -> Peer:
    peer = Peer(*await asyncio.open_connection("127.0.0.1", port))
    _OPEN.append(peer)
    return peer


def _images(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 784), dtype=np.float32)


def _submit(call: int, rows: int = 1, final_only: bool = True, **options: Any) -> Submit:
    fields: dict[str, Any] = {"start": 0, "stop_margin": None, "time_left_ms": None, **options}
    return Submit(call, 0, rows, fields["start"], final_only, fields["stop_margin"], fields["time_left_ms"])


def _rows(state: WorkerState) -> float:
    return sum(s.value for m in state.metrics.rows.collect() for s in m.samples if s.name.endswith("_total"))


@pytest.mark.anyio
async def test_a_hello_gets_the_identity_and_a_call_gets_the_models_answer(channel):
    state, port = channel
    peer = await _peer(port)
    welcome = await peer.hello()
    assert welcome.identity == state.identity and welcome.models == ["member-0"]
    assert (welcome.input_size, welcome.classes) == (784, 10)
    images = _images(2)
    peer.send(Work([_submit(1, rows=2)], []), [images.tobytes()])
    step, payload = await peer.next()
    assert isinstance(step, Step) and [(r.call, r.final, r.rows) for r in step.results] == [(1, True, 2)]
    (probs,) = tensors(payload, [(2, 10)])
    engine = state.models["member-0"].engine
    expected = torch.softmax(engine.forward(torch.from_numpy(images.reshape(2, 1, 28, 28)), 1), 1).numpy()
    assert np.abs(probs - expected).max() < 1e-6


@pytest.mark.anyio
async def test_calls_sent_together_come_back_in_one_frame_per_step(channel):
    _, port = channel
    peer = await _peer(port)
    await peer.hello()
    peer.send(Work([_submit(i) for i in range(1, 6)], []), [_images(1, i).tobytes() for i in range(5)])
    step, _ = await peer.next()
    assert sorted(r.call for r in step.results) == [1, 2, 3, 4, 5]


@pytest.mark.anyio
async def test_every_resolution_of_a_streamed_call_and_its_cancel(channel):
    state, port = channel
    peer = await _peer(port)
    await peer.hello()
    peer.send(Work([_submit(1, final_only=False)], []), [_images(1).tobytes()])
    seen = []
    while not seen or not seen[-1][1]:
        step, _ = await peer.next()
        seen += [(r.resolution, r.final) for r in step.results]
    assert seen == [(0, False), (1, True)]
    before = _rows(state)
    peer.send(Work([_submit(2)], [2]), [_images(1).tobytes()])  # cancelled in the same frame
    peer.send(Ping(1))
    pong, _ = await peer.next()
    assert isinstance(pong, Pong) and pong.ready
    await asyncio.sleep(0.1)
    assert _rows(state) == before  # never computed


@pytest.mark.anyio
async def test_nothing_is_read_before_a_valid_hello(channel, caplog):
    caplog.set_level(logging.WARNING, logger="workers.channel")
    _, port = channel
    eager = await _peer(port)
    eager.send(Work([_submit(1)], []), [_images(1).tobytes()])
    assert await eager.closed()
    wrong = await _peer(port)
    wrong.send(Hello(VERSION, "guess", "test"))
    refused, _ = await wrong.next()
    assert refused == Refuse("wrong shared secret") and await wrong.closed()
    old = await _peer(port)
    old.send(Hello(VERSION + 1, SECRET, "test"))
    refused, _ = await old.next()
    assert refused == Refuse(f"protocol version {VERSION + 1}, this worker speaks {VERSION}")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].endswith("closed: bad frame: Work before HELLO")
    assert lines[1].endswith("closed: HELLO refused (wrong shared secret) from 'test'")
    assert all(line.startswith("channel from 127.0.0.1:") for line in lines)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (struct.pack("<I", 1 << 30), "bad frame: a frame of 1073741824 bytes is over the 67108864-byte cap"),
        (struct.pack("<II", 6, 99) + b"xx", "bad frame: a header of 99 bytes in a frame of 6"),
        (struct.pack("<II", 7, 3) + b"\x93\x63\x00", "bad frame: unreadable header"),
        (b"".join(encode(Work([_submit(7, rows=2)], []), [b"\0" * 16])), "bad frame: the entries need 6272"),
        (b"".join(encode(Work([_submit(1)], []), [b"\0" * 3136])) * 2, "bad frame: call id 1 is not above"),
        (b"".join(encode(Welcome(1, {}, [], 1, 1, 1))), "bad frame: unreadable header"),
    ],
    ids=["over-cap", "header-past-frame", "unknown-type", "truncated-payload", "reused-id", "gateway-message"],
)
async def test_a_broken_frame_closes_its_connection_with_one_line_and_nothing_else(channel, caplog, data, reason):
    caplog.set_level(logging.WARNING, logger="workers.channel")
    _, port = channel
    other = await _peer(port)
    await other.hello()
    broken = await _peer(port)
    await broken.hello()
    broken.writer.write(data)
    assert await broken.closed()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and reason in lines[0], lines
    other.send(Work([_submit(1)], []), [_images(1).tobytes()])
    step, _ = await other.next()
    assert [r.call for r in step.results] == [1]


@pytest.mark.anyio
async def test_a_bad_call_is_refused_alone(channel):
    _, port = channel
    peer = await _peer(port)
    await peer.hello()
    submits = [_submit(1, start=5, final_only=False), Submit(2, 3, 1, 0, True, None, None), _submit(3)]
    peer.send(Work(submits, []), [_images(1).tobytes()] * 3)
    failures: list[Failure] = []
    answered: list[int] = []
    while len(failures) + len(answered) < 3:
        step, _ = await peer.next()
        failures += step.failures
        answered += [r.call for r in step.results]
    assert [(f.call, f.kind) for f in failures] == [(1, "bad_request"), (2, "bad_request")]
    assert failures[0].message == "start resolution 5 is not in 0..1" and answered == [3]


@pytest.mark.anyio
async def test_injected_errors_and_garbage_are_per_call(worker_state: WorkerState):
    worker_state.faults = __import__("workers.faults", fromlist=["FaultInjector"]).FaultInjector(
        FaultSettings(error_rate=0.5, garbage_rate=0.5, garbage_kind="nan", seed=3)
    )
    worker_state.settings.faults.garbage_kind = "nan"
    server, port = await _serve(worker_state)
    try:
        peer = await _peer(port)
        await peer.hello()
        peer.send(Work([_submit(i) for i in range(1, 9)], []), [_images(1).tobytes()] * 8)
        failures, nans = 0, 0
        while failures + nans < 8:
            step, payload = await peer.next()
            failures += len(step.failures)
            if step.results:
                arrays = tensors(payload, [(r.rows, r.classes) for r in step.results])
                nans += sum(bool(np.isnan(a).all()) for a in arrays)
        assert failures > 0 and nans > 0
    finally:
        worker_state.faults = None
        await _close_peers()
        await server.close(grace_s=1.0)
        for served in worker_state.models.values():
            await served.batcher.stop()


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.written: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def writelines(self, data: Any) -> None:
        self.written.append(b"".join(bytes(d) for d in data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=200), chunk=st.integers(1, 64))
def test_garbage_after_a_hello_never_raises_it_closes_or_waits(worker_state: WorkerState, garbage: bytes, chunk: int):
    """Fuzzed: whatever bytes follow a valid HELLO, in whatever pieces, the connection either waits
    for more or closes itself; nothing escapes into the event loop."""

    async def run() -> None:
        server = ChannelServer(worker_state)
        connection = Connection(server)
        transport = _Transport()
        connection.connection_made(transport)
        hello = b"".join(encode(Hello(VERSION, SECRET, "fuzz")))
        data = hello + garbage
        for i in range(0, len(data), chunk):
            connection.data_received(data[i : i + chunk])
            if transport.closed:
                break
        connection.connection_lost(None)
        assert connection.welcomed
        for job_owner in list(connection.calls.values()):
            assert job_owner.cancelled

    logging.getLogger("workers.channel").disabled = True
    try:
        asyncio.run(run())
    finally:
        logging.getLogger("workers.channel").disabled = False
