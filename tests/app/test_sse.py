from __future__ import annotations

import json

import numpy as np
import orjson

from app.decoding import Answer
from app.eventlog import Event
from app.group import Group
from app.responses import response_body
from app.sse import event_bytes, preamble
from app.updates import Update
from protocol.spec import InputSpec, ModelSpec


def _spec(classes: int, labels: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec("g", InputSpec("input", (1, 28, 28)), classes, labels)


def format_event(update: Update, group: Group, request_id: str | None) -> bytes:
    data = orjson.dumps(response_body(update, group, request_id))
    return event_bytes(Event(update.seq, update.event, update.status, data))


def _group() -> Group:
    return Group("g", ["a", "b"], {"c": 0}, np.array([[0.5, 0.5]]), 2, [4, None], _spec(2, ("x", "y")), {})


def test_event_has_id_event_and_a_v2_response_as_data():
    answers = {"a": Answer(np.array([[0.9, 0.1]]), 1, True), "b": Answer(np.array([[0.3, 0.7]]), 0, False)}
    update = Update("refined", 3, 12.5, answers, ["a", "b"])
    raw = format_event(update, _group(), "rid")
    head, data = raw.decode().split("data: ")
    assert head == "id: 3\nevent: refined\n"
    assert raw.endswith(b"\n\n")
    body = json.loads(data)
    assert body["id"] == "rid" and body["model_name"] == "g"
    assert [o["name"] for o in body["outputs"]] == ["a", "b", "ensemble"]
    assert body["outputs"][2]["data"] == [0.6000000238418579, 0.4000000059604645]
    assert body["parameters"] == {
        "seq": 3,
        "resolution": 0,
        "planes": 4,
        "exact_members": ["a"],
        "decoded_members": ["b"],
        "approximate": True,
        "elapsed_ms": 12.5,
    }


def test_error_event_carries_only_the_error():
    raw = format_event(Update("error", 1, 5.0, error="boom", status=503, members=["a"]), _group(), None)
    assert raw == b'id: 1\nevent: error\ndata: {"error":"boom"}\n\n'


def test_stream_starts_with_a_retry_hint():
    assert preamble() == b"retry: 2000\n\n"
