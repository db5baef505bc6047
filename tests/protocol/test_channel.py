"""The channel's frame codec (protocol/channel.py): every message round-trips with its tensors, a
byte stream cut anywhere gives the same frames, and anything else is a FrameError (fuzzed)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from protocol.channel import (
    FLOAT,
    VERSION,
    Failure,
    FrameError,
    FrameReader,
    Hello,
    Ping,
    Pong,
    Refuse,
    Result,
    Step,
    Submit,
    Welcome,
    Work,
    encode,
    frame_bytes,
    tensors,
)

TO_WORKER = [
    Hello(VERSION, "secret", "gateway pid 1"),
    Work([Submit(1, 0, 2, 0, True, None, None), Submit(2, 1, 1, 0, False, 0.5, 250.0)], [7, 9]),
    Ping(3),
]
TO_GATEWAY = [
    Welcome(VERSION, {"bundle_sha256": "a" * 64, "model": "m0", "refinement": [4]}, ["m0"], 784, 10, 64),
    Refuse("wrong shared secret"),
    Step([Result(1, 0, 4, False, False, 2, 10), Result(2, 1, None, True, False, 1, 10)], [Failure(3, "injected", "x")]),
    Pong(3, True, ""),
]


@pytest.mark.parametrize("message", TO_WORKER, ids=lambda m: type(m).__name__)
def test_gateway_messages_round_trip(message):
    payload = [np.arange(3 * 784, dtype=FLOAT).tobytes()] if isinstance(message, Work) else []
    ((decoded, data),) = FrameReader(to_worker=True).feed(frame_bytes(message, payload))
    assert decoded == message and bytes(data) == b"".join(payload)


@pytest.mark.parametrize("message", TO_GATEWAY, ids=lambda m: type(m).__name__)
def test_worker_messages_round_trip(message):
    payload = [np.linspace(0, 1, 30, dtype=FLOAT).tobytes()] if isinstance(message, Step) else []
    ((decoded, data),) = FrameReader(to_worker=False).feed(frame_bytes(message, payload))
    assert decoded == message and bytes(data) == b"".join(payload)


def test_tensors_are_cut_per_entry_and_must_add_up():
    first, second = np.ones((2, 10), FLOAT), np.full((1, 10), 2, FLOAT)
    payload = memoryview(first.tobytes() + second.tobytes())
    a, b = tensors(payload, [(2, 10), (1, 10)])
    assert (a == first).all() and (b == second).all() and not a.flags.writeable
    with pytest.raises(FrameError, match="the entries need 80 payload bytes, the frame has 120"):
        tensors(payload, [(2, 10)])
    with pytest.raises(FrameError, match="every one needs rows and values"):
        tensors(memoryview(b""), [(0, 10)])


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_a_stream_cut_anywhere_gives_the_same_frames(cuts):
    payload = [np.arange(784, dtype=FLOAT).tobytes()]
    stream = b"".join(frame_bytes(m, payload if isinstance(m, Work) else []) for m in TO_WORKER)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    reader = FrameReader(to_worker=True)
    got = []
    for start, end in zip(points, points[1:], strict=False):
        got += [(m, bytes(p)) for m, p in reader.feed(stream[start:end])]
    assert [m for m, _ in got] == TO_WORKER and reader.buffer == bytearray()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack("<I", (64 << 20) + 1), "over the 67108864-byte cap"),
        (struct.pack("<I", 2) + b"xx", "cannot hold its header length"),
        (struct.pack("<II", 8, 10) + b"abcd", "a header of 10 bytes in a frame of 8"),
        (struct.pack("<II", 5, 1) + b"\xc1", "unreadable header"),
        (frame_bytes(Pong(1, True, "")), "unreadable header"),  # a worker's message sent to a worker
    ],
    ids=["over-cap", "too-short", "header-past-end", "not-msgpack", "wrong-side"],
)
def test_broken_frames_are_frame_errors(data, message):
    with pytest.raises(FrameError, match=message):
        list(FrameReader(to_worker=True).feed(data))


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300), to_worker=st.booleans())
def test_fuzzed_bytes_are_frames_or_a_frame_error_never_anything_else(data, to_worker):
    reader = FrameReader(to_worker=to_worker)
    try:
        for message, payload in reader.feed(data):
            assert isinstance(message, (Hello, Work, Ping) if to_worker else (Welcome, Refuse, Step, Pong))
            assert isinstance(payload, memoryview)
    except FrameError:
        pass


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, 10_000), value=st.integers(0, 255))
def test_a_valid_frame_with_one_byte_changed_decodes_or_is_a_frame_error(index, value):
    frame = bytearray(frame_bytes(TO_GATEWAY[2], [np.zeros(30, FLOAT).tobytes()]))
    frame[index % len(frame)] = value
    reader = FrameReader(to_worker=False, max_frame_bytes=1 << 16)
    try:
        for message, payload in reader.feed(bytes(frame)):
            if isinstance(message, Step) and message.results:
                try:
                    tensors(payload, [(r.rows, r.classes) for r in message.results])
                except FrameError:
                    pass
    except FrameError:
        pass


def test_encode_leaves_the_payload_buffers_alone():
    payload = memoryview(np.zeros(4, FLOAT).tobytes())
    parts = encode(Ping(1), [payload])
    assert parts[-1] is payload


def test_a_welcome_carries_the_warm_up_and_an_older_peer_still_decodes_it():
    """`Welcome.warm_ms` (issue 29) is its last field with a default: a worker that sends none (an
    older one) decodes with it empty, and one that sends it is read back intact."""
    import msgspec

    older = msgspec.msgpack.encode([11, 1, {"model": "member-0"}, ["member-0"], 784, 10, 256])
    (message, _), *_ = FrameReader(to_worker=False).feed(_frame(older))
    assert isinstance(message, Welcome) and message.warm_ms == []
    newer = Welcome(1, {"model": "member-0"}, ["member-0"], 784, 10, 256, [[0.4, 0.3]])
    (message, _), *_ = FrameReader(to_worker=False).feed(frame_bytes(newer))
    assert message.warm_ms == [[0.4, 0.3]]


def _frame(header: bytes) -> bytes:
    return struct.pack("<II", 4 + len(header), len(header)) + header
