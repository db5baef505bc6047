"""Authentication with real processes: a client bearer token on the gateway and a separate shared
secret between gateway and workers, both read from mounted files, neither ever written to a log."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app import launcher
from app.tickets import Tickets
from tests.integration.conftest import Running, call_worker, images_of, parse_sse, request_body, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
TOKEN = "client-token-7f3a9c"
SECRET = "worker-secret-51be02"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
PAGE_PORT = launcher.free_port()  # pages from here may call the gateway (the browser test)


@pytest.fixture(scope="module")
def secured(coded_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Path]]:
    folder = tmp_path_factory.mktemp("secrets")
    (folder / "token").write_text(TOKEN + "\n")  # as `kubectl create secret` files often end
    (folder / "worker").write_text(SECRET)
    logs = folder / "logs"
    env = {
        "COINSERVE_AUTH_TOKEN_FILE": str(folder / "token"),
        "COINSERVE_WORKER_SECRET_FILE": str(folder / "worker"),  # the gateway sends it
        "COINSERVE_WORKER_SHARED_SECRET_FILE": str(folder / "worker"),  # the workers demand it
        "COINSERVE_CORS_ORIGINS": f"http://127.0.0.1:{PAGE_PORT}",
    }
    with running(coded_bundle, env=env, log_dir=logs, gateway_args=["--log-level", "debug"], grpc=True) as service:
        yield service, logs


def infer(service: Running, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{service.url}/v2/models/fashion/infer", json=request_body(1), headers=headers, timeout=30)


def test_the_right_token_is_served(secured):
    service, _ = secured
    response = infer(service, {"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and response.json()["outputs"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["missing", "wrong", "no-scheme", "basic"],
)
def test_a_missing_or_wrong_token_gets_401_and_no_detail(secured, headers):
    service, _ = secured
    response = infer(service, headers)
    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}  # the same answer whatever was wrong
    assert response.headers["www-authenticate"] == "Bearer"


def test_streams_and_resumption_need_the_token_too(secured):
    service, _ = secured
    created = httpx.post(f"{service.url}/v1/requests", json=request_body(1), timeout=30)
    assert created.status_code == 401
    created = httpx.post(
        f"{service.url}/v1/requests", json=request_body(1), headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    assert created.status_code in (200, 201, 202)
    events_url = f"{service.url}/v1/requests/{created.json()['id']}/events"
    assert httpx.get(events_url, timeout=30).status_code == 401


def start(service: Running, **body: object) -> dict:
    created = httpx.post(f"{service.url}/v1/requests", json={**request_body(1), **body}, headers=BEARER, timeout=30)
    assert created.status_code == 202, created.text
    return created.json()


def events_of(url: str, headers: dict[str, str] | None = None) -> list[dict]:
    with httpx.stream("GET", url, headers=headers, timeout=30) as r:
        assert r.status_code == 200, r.read()
        return parse_sse(r.read().decode())


def test_the_ticket_in_events_url_follows_and_polls_its_request_without_the_token(secured):
    service, _ = secured
    created = start(service)
    assert created["events_url"].startswith(f"/v1/requests/{created['id']}/events?ticket=")
    names = [e["event"] for e in events_of(service.url + created["events_url"])]
    assert names[0] == "coarse" and names[-1] == "final" and names.count("final") == 1, names
    polled = httpx.get(service.url + created["poll_url"], timeout=10)
    assert polled.status_code == 200 and polled.json()["state"] == "final"


def test_the_bearer_token_still_follows_and_polls_without_a_ticket(secured):
    service, _ = secured
    created = start(service)
    base = f"{service.url}/v1/requests/{created['id']}"
    assert [e["event"] for e in events_of(base + "/events", BEARER)][-1] == "final"
    assert httpx.get(base, headers=BEARER, timeout=10).json()["state"] == "final"
    assert httpx.get(base, timeout=10).json() == {"error": "unauthorized"}


def _ticket_of(created: dict) -> str:
    return created["events_url"].split("?ticket=", 1)[1]


def _altered(ticket: str) -> str:
    """Another first character of its MAC (the last one's spare bits might spell the same bytes)."""
    return ticket[:-43] + ("A" if ticket[-43] != "A" else "B") + ticket[-42:]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("other", "ticket is for another request, not '{id}'"),
        ("altered", "invalid ticket: this gateway did not issue it (or its auth token changed since)"),
        ("expired", "ticket expired (tickets last as long as the request's retention)"),
        ("none", "unauthorized"),
    ],
)
@pytest.mark.parametrize("route", ["/events", ""], ids=["events", "poll"])
def test_a_wrong_ticket_gets_401_naming_the_reason(secured, bad, reason, route):
    service, _ = secured
    created, other = start(service), start(service)
    request_id = created["id"]
    ticket = {
        "other": _ticket_of(other),
        "altered": _altered(_ticket_of(created)),
        "expired": Tickets.from_token(TOKEN).issue(request_id, time.time() - 1),  # the right key, past its expiry
        "none": None,
    }[bad]
    params = {"ticket": ticket} if ticket is not None else {}
    refused = httpx.get(f"{service.url}/v1/requests/{request_id}{route}", params=params, timeout=10)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.json() == {"error": reason.format(id=request_id)}


def test_a_browser_eventsource_follows_a_request_on_an_authenticated_gateway(secured, browser):
    """The README's page with the token filled in, from an allowed origin, in headless Chromium: its
    EventSource (no Authorization header) gets coarse … final with the ticket, and is refused without."""
    from tests.integration.test_browser import outcome, serve_page
    from tests.integration.test_readme import example

    service, _ = secured
    html = example("browser").replace("localhost:8000", f"127.0.0.1:{service.port}")
    html = html.replace('const TOKEN = "";', f'const TOKEN = "{TOKEN}";')
    without = html.replace(
        "new EventSource(GATEWAY + events_url)", 'new EventSource(GATEWAY + events_url.split("?")[0])'
    )
    assert TOKEN in html and without != html
    server = serve_page(PAGE_PORT, "")
    try:
        server.RequestHandlerClass.html = html.encode()
        done, events = outcome(browser, f"http://127.0.0.1:{PAGE_PORT}/")
        kinds = [e["kind"] for e in events]
        assert done == "ok" and kinds[0] == "coarse" and kinds[-1] == "final" and kinds.count("final") == 1, kinds
        assert events[-1]["answer"]["id"] == browser.execute_script("return window.requestId")
        server.RequestHandlerClass.html = without.encode()
        done, events = outcome(browser, f"http://127.0.0.1:{PAGE_PORT}/?without")
        assert done == "closed" and events == []
    finally:
        server.shutdown()
        server.server_close()


def test_probes_stay_open_for_the_kubelet(secured):
    service, _ = secured
    assert httpx.get(f"{service.url}/v2/health/live", timeout=5).status_code == 200
    assert httpx.get(f"{service.url}/v2/health/ready", timeout=5).status_code == 200


def test_workers_refuse_channels_without_the_gateway_secret(secured):
    """A worker reads nothing on a channel before a HELLO with the shared secret (DESIGN §3)."""
    from app.channel import NotWelcomedError

    service, _ = secured
    worker = service.child("member-0")
    for wrong in ("", SECRET[:-1]):
        with pytest.raises(NotWelcomedError, match="the worker refused the HELLO: wrong shared secret"):
            call_worker(worker, images_of(1), secret=wrong)
    right = call_worker(worker, images_of(1), secret=SECRET)
    assert [a.final for a in right.answers] == [True] and right.errors == []
    assert httpx.get(f"{worker.url}/v2/health/ready", timeout=5).status_code == 200


def test_the_console_asks_for_the_token_and_says_when_it_is_wrong(secured, browser):
    """A real Chromium on the console: no token → it asks for one; a wrong one → an error that says
    so (not a blank page); the right one → the examples, and an example's final answer."""
    from tests.integration.test_console import attr, by_testid, final_of, wait

    service, _ = secured
    browser.get(service.url + "/")
    wait(browser, lambda d: by_testid(d, "error").is_displayed())
    assert "needs a token" in by_testid(browser, "error").text and by_testid(browser, "token-form").is_displayed()
    by_testid(browser, "token-input").send_keys(TOKEN + "x")
    by_testid(browser, "token-submit").click()
    wait(browser, lambda d: "refused this token" in by_testid(d, "error").text)
    assert by_testid(browser, "token-form").is_displayed()
    by_testid(browser, "token-input").clear()
    by_testid(browser, "token-input").send_keys(TOKEN)
    by_testid(browser, "token-submit").click()
    wait(browser, lambda d: attr(d, "replica-member-0", "data-ready") == "true")
    assert not by_testid(browser, "error").is_displayed() and not by_testid(browser, "token-form").is_displayed()
    by_testid(browser, "example-0").click()
    text, state, _ = final_of(browser)
    assert state in {"exact", "approximate"} and text


def test_no_secret_reaches_a_log(secured):
    """Runs last: after every call above (debug logging on the gateway), grep every process's output."""
    service, logs = secured
    infer(service, {"Authorization": f"Bearer {TOKEN}"})
    infer(service, {"Authorization": "Bearer guess"})
    files = list(logs.glob("*.log"))
    assert len(files) == len(service.cluster.children)
    text = "".join(f.read_text(errors="replace") for f in files)
    assert text  # the logs are really there (access logs at least)
    assert TOKEN not in text and SECRET not in text and "guess" not in text


def test_grpc_wants_the_bearer_token_as_metadata(secured):
    """Triton's gRPC client with `authorization: Bearer <token>` metadata is served; without it, or
    with another token, the call gets UNAUTHENTICATED."""
    import time

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from tests.integration.conftest import images_of

    service, _ = secured
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{service.grpc_port}")
    tensor = grpcclient.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(images_of(1))
    try:
        for _ in range(5):  # UNAVAILABLE is the overload refusal (a late loop on a shared host): retry
            try:
                result = client.infer("fashion", [tensor], headers={"authorization": f"Bearer {TOKEN}"})
                break
            except InferenceServerException as exc:
                if exc.status() != "StatusCode.UNAVAILABLE":
                    raise
                time.sleep(0.2)
        assert result.as_numpy("ensemble").shape == (1, 10)
        for headers in ({}, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException) as refused:
                client.infer("fashion", [tensor], headers=headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    finally:
        client.close()
