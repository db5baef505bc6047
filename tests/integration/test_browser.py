"""A real browser (Debian's headless Chromium, driven by selenium) on a page from another origin
(issue 14): listed in COINSERVE_CORS_ORIGINS, the page POSTs a request (a preflighted JSON call),
follows its EventSource and receives `coarse` and `final`; from an origin not listed, the browser
itself refuses to hand the page the answer."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import Public
from tests.integration.test_readme import example

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # the first to run pays for the session bundles


class Page(http.server.BaseHTTPRequestHandler):
    html = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write(self.html)

    def log_message(self, *_args) -> None:
        pass


def serve_page(port: int, html: str) -> http.server.ThreadingHTTPServer:
    handler = type("ThisPage", (Page,), {"html": html.encode()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def pages(public: Public) -> Iterator[dict[str, str]]:
    html = example("browser", public)  # the README's page, calling this service
    servers = [serve_page(public.allowed_port, html), serve_page(public.refused_port, html)]
    try:
        yield {"allowed": public.allowed_origin + "/", "refused": public.refused_origin + "/"}
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def outcome(driver, url: str) -> tuple[str, list[dict]]:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    done = WebDriverWait(driver, 30, poll_frequency=0.05).until(lambda d: d.execute_script("return window.done"))
    return done, driver.execute_script("return window.events")


def test_a_listed_origin_gets_coarse_then_final_over_eventsource(browser, pages):
    done, events = outcome(browser, pages["allowed"])
    kinds = [e["kind"] for e in events]
    assert done == "ok" and kinds[0] == "coarse" and kinds[-1] == "final" and kinds.count("final") == 1, kinds
    assert [o["name"] for o in events[-1]["answer"]["outputs"]][-1] == "ensemble"
    assert browser.execute_script("return window.requestId")  # an exposed header


def test_an_origin_not_listed_is_refused_by_the_browser(browser, pages):
    done, events = outcome(browser, pages["refused"])
    assert done.startswith("refused: TypeError") and events == []


def test_preflight_answers(public: Public):
    """What the browser asked above, spelled out: the preflight of a JSON POST from a listed origin
    is allowed (with credentials, never `*`); from another origin it gets no CORS headers."""
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    url = f"{public.service.url}/v1/requests"
    allowed = httpx.options(url, headers={"Origin": public.allowed_origin, **ask}, timeout=5)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == public.allowed_origin
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    refused = httpx.options(url, headers={"Origin": public.refused_origin, **ask}, timeout=5)
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    served = httpx.get(f"{public.service.url}/v2/health/live", headers={"Origin": public.allowed_origin}, timeout=5)
    assert "x-request-id" in served.headers["access-control-expose-headers"].lower()
