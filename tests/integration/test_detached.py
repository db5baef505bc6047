"""`POST /v1/requests` and `GET /v1/requests/{id}` on a real gateway (issue 28): the request's id,
its `X-Request-ID` and the id in its URLs are one; a poll says running, final or error with the last
event and, once ended, the answer; 404 once retention has dropped it.

Slow workers (every resolution after the first takes 150 ms, 8 resolutions) keep a request running
for about a second; member-0 answers every call with an error, so a request for it alone ends in
`error` while the others are decoded; retention is 2 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Running, request_body, running, with_plan

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
RETENTION_S = 2.0


@pytest.fixture(scope="module")
def detached(coded_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    bundle = with_plan(coded_bundle, [1, 2, 3, 4, 5, 6, 7], tmp_path_factory.mktemp("detached"))
    env = {"COINSERVE_WORKER_FAULT_STEP_DELAY_MS": "150", "COINSERVE_RETENTION_S": str(RETENTION_S)}
    failing = {"member-0": {"COINSERVE_WORKER_FAULT_ERROR_RATE": "1"}}
    with running(bundle, env=env, worker_env=failing) as service:
        yield service


def post(service: Running, body: dict | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{service.url}/v1/requests", json=body or request_body(1), headers=headers, timeout=10)


def poll_until_ended(service: Running, request_id: str) -> dict:
    for _ in range(300):
        polled = httpx.get(f"{service.url}/v1/requests/{request_id}", timeout=10).json()
        if polled["state"] != "running":
            return polled
        time.sleep(0.05)
    pytest.fail(f"{request_id} still running after 300 polls: {polled}")


def test_a_fresh_id_is_the_header_the_body_and_the_urls(detached):
    created = post(detached)
    assert created.status_code == 202
    request_id = created.json()["id"]
    assert created.headers["x-request-id"] == request_id
    assert created.json() == {
        "id": request_id,
        "events_url": f"/v1/requests/{request_id}/events",
        "poll_url": f"/v1/requests/{request_id}",
    }
    assert created.headers["location"] == f"/v1/requests/{request_id}/events"


@pytest.mark.parametrize("where", ["body", "header", "both"])
def test_the_clients_id_names_the_request(detached, where):
    request_id = f"client-{where}-{time.monotonic_ns()}"
    body = {**request_body(1), "id": request_id} if where != "header" else request_body(1)
    headers = {"X-Request-ID": request_id} if where != "body" else {}
    created = post(detached, body, headers)
    assert created.status_code == 202, created.text
    assert created.json()["id"] == created.headers["x-request-id"] == request_id
    assert poll_until_ended(detached, request_id)["answer"]["id"] == request_id


def test_a_body_id_and_a_header_that_differ_get_400_naming_both(detached):
    refused = post(detached, {**request_body(1), "id": "in-body"}, {"X-Request-ID": "in-header"})
    assert refused.status_code == 400
    assert refused.json() == {
        "error": "the body's id 'in-body' and the X-Request-ID header 'in-header' differ: send one, or the same in both"
    }


@pytest.mark.parametrize("bad", ["a/b", "..", "x" * 129, "with space"])
def test_an_id_that_cannot_go_in_a_url_gets_400(detached, bad):
    refused = post(detached, {**request_body(1), "id": bad})
    assert refused.status_code == 400
    assert refused.json()["error"].startswith(f"id {bad!r} cannot name a /v1 request")


def test_a_poll_says_running_then_final_with_the_answer_then_404(detached):
    request_id = post(detached).json()["id"]
    running_now = httpx.get(f"{detached.url}/v1/requests/{request_id}", timeout=10).json()
    assert running_now["state"] == "running" and set(running_now) == {"id", "state", "last_event"}
    assert running_now["last_event"] is None or running_now["last_event"]["event"] in {"coarse", "refined"}
    ended = poll_until_ended(detached, request_id)
    assert ended["state"] == "final" and ended["status"] == 200
    assert ended["last_event"]["event"] == "final" and ended["last_event"]["id"] >= 2
    assert ended["answer"] == ended["last_event"]["data"]
    assert [o["name"] for o in ended["answer"]["outputs"]][-1] == "ensemble"
    time.sleep(RETENTION_S + 0.5)
    gone = httpx.get(f"{detached.url}/v1/requests/{request_id}", timeout=10)
    assert gone.status_code == 404 and "retention" in gone.json()["error"]


def test_a_poll_of_a_request_that_failed_says_error_with_its_status(detached):
    request_id = post(detached, request_body(1, {"members": ["member-0"]})).json()["id"]
    ended = poll_until_ended(detached, request_id)
    assert ended["state"] == "error" and ended["status"] >= 500
    assert ended["last_event"]["event"] == "error" and ended["answer"] == ended["last_event"]["data"]
    assert set(ended["answer"]) == {"error"}


def test_an_unknown_request_is_404(detached):
    missing = httpx.get(f"{detached.url}/v1/requests/nosuch", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"].startswith("no request 'nosuch'")
