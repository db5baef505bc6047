from __future__ import annotations

import numpy as np
import orjson

from app.decoding import Answer
from app.eventlog import Event
from app.group import Group
from app.responses import render, response_body
from app.updates import Update
from protocol.spec import InputSpec, ModelSpec
from protocol.v2 import InferRequest, RequestedOutput

IMAGES = np.zeros((1, 1, 28, 28), np.float32)


def _spec(classes: int, labels: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec("g", InputSpec("input", (1, 28, 28)), classes, labels)


def _group() -> Group:
    return Group("g", ["a", "b"], {"c": 0}, np.array([[0.5, 0.5]]), 2, [4, None], _spec(2, ("x", "y")), {})


def _event(keep_update: bool) -> Event:
    answers = {"a": Answer(np.array([[0.9, 0.1]]), 1, True), "b": Answer(np.array([[0.3, 0.7]]), 1, True)}
    update = Update("final", 2, 7.0, answers, ["a", "b"])
    data = orjson.dumps(response_body(update, _group(), "rid"))
    return Event(2, "final", 200, data, update if keep_update else None)


def test_the_default_request_gets_the_logged_bytes():
    event = _event(True)
    assert render(event, InferRequest(IMAGES, {}, "rid"), _group()) == (event.data, "application/json", {})


def test_chosen_outputs_in_their_order_binary_after_the_header_from_either_store():
    request = InferRequest(IMAGES, {}, "rid", [RequestedOutput("ensemble", True), RequestedOutput("a", False)])
    bodies = [render(_event(keep), request, _group()) for keep in (True, False)]  # local log; shared store
    assert bodies[0] == bodies[1]
    body, media_type, headers = bodies[0]
    length = int(headers["Inference-Header-Content-Length"])
    head = orjson.loads(body[:length])
    assert media_type == "application/octet-stream" and head["id"] == "rid" and head["model_version"] == "1"
    assert [o["name"] for o in head["outputs"]] == ["ensemble", "a"] and head["parameters"]["seq"] == 2
    assert np.array_equal(np.frombuffer(body[length:], "<f4"), np.array([0.6, 0.4], np.float32))
    assert head["outputs"][1]["data"] == [0.8999999761581421, 0.10000000149011612]
