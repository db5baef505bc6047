"""The gateway ↔ worker channel (DESIGN §3): one persistent connection per worker process carrying
length-prefixed binary frames, every request of an event-loop tick in one frame each way.

A frame on the wire:

    u32 little-endian  N: the length of what follows
    u32 little-endian  H: the length of the header
    H bytes            the header: one msgpack message below (msgspec, array-like, tagged)
    N - 4 - H bytes    the payload: the frame's tensors, raw little-endian float32, back to back
                       in the order of the header's entries (a Submit's rows × input size values,
                       a Result's rows × classes values)

Gateway → worker: `Hello` once, first (shared secret, protocol version); then `Work` frames (submits
and cancels) and `Ping`s. Worker → gateway: `Welcome` (its identity: bundle sha256, models, plan)
or `Refuse` (then it closes); then `Step` frames, one per computed step (every result of the step,
and failures), and `Pong`s. Nothing but a `Hello` is read before a valid `Hello`.

msgspec (the codec vLLM's engine uses for the same job) because a header entry costs about a
microsecond to encode or decode; tensors never go through it. Why this shape and what it replaced:
docs/serving.md and ../shared/research/dataplane.md.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import numpy as np

VERSION = 1
MAX_FRAME_BYTES = 64 << 20  # a peer that announces more is broken or hostile: the connection closes
FLUSH_BYTES = 8 << 20  # a sender starts a new frame once this much payload is buffered
_LENGTHS = struct.Struct("<II")
_LENGTH = struct.Struct("<I")
FLOAT = np.dtype("<f4")


class FrameError(ValueError):
    """A frame that does not follow this protocol; the message says how (the connection closes)."""


# gateway → worker --------------------------------------------------------------------------------
class Hello(msgspec.Struct, array_like=True, tag=1):
    version: int
    secret: str  # the shared secret, "" when the gateway has none
    peer: str  # who is calling (for the worker's log)


class Submit(msgspec.Struct, array_like=True, tag=2):
    """One replica call: `rows` rows of the input tensor in the frame's payload."""

    call: int  # the gateway's id of this call on this connection, increasing
    model: int  # index into the worker's `Welcome.models`
    rows: int
    start: int  # the first resolution wanted
    final_only: bool  # only the float32 resolution (nobody reads the coarse ones)
    stop_margin: float | None  # stop at a coarse resolution once every row is this confident
    time_left_ms: float | None  # the request's deadline, as time left when the frame was sent
    # Every coarse resolution from `start`, even those the worker measured no cheaper than float32
    # (which it otherwise skips: issue 31). Last and defaulted: an older peer omits it.
    coarse: bool = False


class Work(msgspec.Struct, array_like=True, tag=3):
    submits: list[Submit]
    cancels: list[int]  # calls whose answers are no longer needed: never start their next step


class Ping(msgspec.Struct, array_like=True, tag=4):
    seq: int


# worker → gateway --------------------------------------------------------------------------------
class Welcome(msgspec.Struct, array_like=True, tag=11):
    version: int
    identity: dict[str, Any]  # {"bundle_sha256", "model", "refinement"} (DESIGN §3)
    models: list[str]  # what `Submit.model` indexes
    input_size: int  # values per row of a submit
    classes: int  # values per row of a result
    max_rows: int  # the most rows one submit may carry
    # Its warm-up before it said ready, per model in `models` order: the fastest batch-1 ms of each
    # resolution (the gateway's first patience for it). Last and defaulted: an older peer omits it.
    warm_ms: list[list[float]] = msgspec.field(default_factory=list)
    # Per model in `models` order: which resolutions it serves and why, measured on its machine
    # (workers/costs.py `report`: live, cost ratios at batch 1 and the typical batch, reasons).
    resolutions: list[dict[str, Any]] = msgspec.field(default_factory=list)


class Refuse(msgspec.Struct, array_like=True, tag=12):
    reason: str


class Result(msgspec.Struct, array_like=True, tag=13):
    """One call's answer at one resolution: `rows` × classes probabilities in the payload."""

    call: int
    resolution: int
    planes: int | None  # None: float32
    final: bool  # the float32 resolution
    stopped: bool  # confident at this coarse resolution: the call's last result (stop_margin)
    rows: int
    classes: int  # values per row (the gateway refuses a result whose width is not its class count)
    slower: bool = False  # a coarse resolution asked for explicitly that costs no less than float32


class Failure(msgspec.Struct, array_like=True, tag=14):
    call: int
    kind: str  # worker_error | bad_request | injected
    message: str


class Step(msgspec.Struct, array_like=True, tag=15):
    results: list[Result]
    failures: list[Failure]


class Pong(msgspec.Struct, array_like=True, tag=16):
    seq: int
    ready: bool  # False while the worker drains (SIGTERM): send it nothing new
    reason: str
    # The worker's `Welcome.resolutions` again, when they have changed since its last Pong (idle
    # re-timing); None when unchanged.
    resolutions: list[dict[str, Any]] | None = None


ToWorker = Hello | Work | Ping
ToGateway = Welcome | Refuse | Step | Pong

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_to_gateway = msgspec.msgpack.Decoder(ToGateway)


def encode(message: msgspec.Struct, payload: list[bytes | memoryview] | None = None) -> list[bytes | memoryview]:
    """A frame as buffers for `transport.writelines` (the payload is never copied here)."""
    header = _encoder.encode(message)
    size = sum(len(p) for p in payload) if payload else 0
    return [_LENGTHS.pack(4 + len(header) + size, len(header)), header, *(payload or ())]


def frame_bytes(message: msgspec.Struct, payload: list[bytes | memoryview] | None = None) -> bytes:
    return b"".join(encode(message, payload))


class Outbox:
    """One side's next frame: entries with their tensors (submits, or results) and bare entries
    (cancels, or failures) collected during an event-loop tick and written as one frame, flushed
    with `call_soon` (no timer, so nothing waits for company), or at once past FLUSH_BYTES."""

    def __init__(
        self,
        make: Callable[[list[Any], list[Any]], msgspec.Struct],
        write: Callable[[msgspec.Struct, list[bytes | memoryview]], None],
    ) -> None:
        self.make, self.write = make, write
        self.entries: list[Any] = []
        self.others: list[Any] = []
        self.payload: list[bytes | memoryview] = []
        self.size = 0
        self.scheduled = False

    def put(self, entry: Any, data: bytes | memoryview) -> None:
        self.entries.append(entry)
        self.payload.append(data)
        self.size += len(data)
        self._schedule()

    def put_other(self, entry: Any) -> None:
        self.others.append(entry)
        self._schedule()

    def _schedule(self) -> None:
        if self.size >= FLUSH_BYTES:
            self.flush()
        elif not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if not self.entries and not self.others:
            return
        message, payload = self.make(self.entries, self.others), self.payload
        self.entries, self.others, self.payload, self.size = [], [], [], 0
        self.write(message, payload)


class FrameReader:
    """Cuts a byte stream into frames and decodes their headers; raises FrameError on anything that
    does not follow the protocol (the caller closes the connection: nothing after it can be trusted).

    `to_worker` picks which side's messages are legal here."""

    def __init__(self, to_worker: bool, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.decoder = _to_worker if to_worker else _to_gateway
        self.max_frame_bytes = max_frame_bytes
        self.buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[Any, memoryview]]:
        """Every complete frame in what has arrived so far, as (message, payload)."""
        self.buffer += data
        buffer = self.buffer
        start = 0
        try:
            while len(buffer) - start >= 4:
                (length,) = _LENGTH.unpack_from(buffer, start)
                if length > self.max_frame_bytes:
                    raise FrameError(f"a frame of {length} bytes is over the {self.max_frame_bytes}-byte cap")
                if length < 4:
                    raise FrameError(f"a frame of {length} bytes cannot hold its header length")
                if len(buffer) - start - 4 < length:
                    break
                body = bytes(buffer[start + 4 : start + 4 + length])
                start += 4 + length
                yield self._decode(body)
        finally:
            del buffer[:start]

    def _decode(self, body: bytes) -> tuple[Any, memoryview]:
        (header_length,) = _LENGTH.unpack_from(body, 0)
        if header_length > len(body) - 4:
            raise FrameError(f"a header of {header_length} bytes in a frame of {len(body)}")
        view = memoryview(body)
        try:
            message = self.decoder.decode(view[4 : 4 + header_length])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise FrameError(f"unreadable header: {exc}") from None
        return message, view[4 + header_length :]


def tensors(payload: memoryview, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """The payload cut into one (rows, width) float32 array per entry; FrameError unless every shape
    is positive and the sizes add up exactly. The arrays are read-only views of the frame's bytes."""
    if any(rows <= 0 or width <= 0 for rows, width in shapes):
        raise FrameError(f"entries of shapes {shapes[:8]}: every one needs rows and values")
    needed = sum(rows * width for rows, width in shapes) * FLOAT.itemsize
    if needed != len(payload):
        raise FrameError(f"the entries need {needed} payload bytes, the frame has {len(payload)}")
    flat = np.frombuffer(payload, dtype=FLOAT)
    out, offset = [], 0
    for rows, width in shapes:
        out.append(flat[offset : offset + rows * width].reshape(rows, width))
        offset += rows * width
    return out
