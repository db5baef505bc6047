"""`/docs` and `/redoc` work without internet (issue 29): the gateway serves its own API page, with
no script and nothing from another origin, that lists every route of `/openapi.json` and links it;
in headless Chromium it loads with no console error (a blocked load would be one) and asks
nothing of anyone but the gateway."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import httpx
import pytest

from tests.integration.conftest import Public

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


class Page(HTMLParser):
    """What a browser would fetch or run: every tag with its attributes, and the links."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def urls(self) -> list[str]:
        return [v for _, attrs in self.tags for k, v in attrs.items() if k in ("src", "href") and v]


@pytest.mark.parametrize("route", ["/docs", "/redoc"])
def test_the_api_page_is_self_contained_and_links_the_openapi_document(public: Public, route: str):
    base = public.service.url
    response = httpx.get(base + route, timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = Page()
    page.feed(response.text)
    assert not [tag for tag, _ in page.tags if tag in ("script", "iframe", "object", "embed")]
    assert "/openapi.json" in page.urls()
    assert all(u.startswith("/") and not u.startswith("//") for u in page.urls()), page.urls()
    assert "https://" not in response.text and "http://" not in response.text
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src" not in policy
    document = httpx.get(base + "/openapi.json", timeout=10).json()
    for path in document["paths"]:  # every route, the hot infer ones included
        assert f"<code>{path}</code>" in response.text
    assert "/v2/models/{group}/infer" in document["paths"]


def test_the_api_page_loads_clean_in_a_browser_from_the_gateway_only(browser, public: Public):
    from selenium.webdriver.common.by import By

    base = public.service.url
    browser.get_log("browser"), browser.get_log("performance")  # drop what earlier tests left
    browser.get(base + "/docs")
    rows = browser.find_elements(By.CSS_SELECTOR, "tbody tr")
    paths = httpx.get(base + "/openapi.json", timeout=10).json()["paths"]
    assert len(rows) == sum(len(operations) for operations in paths.values())  # one row per operation
    link = browser.find_element(By.CSS_SELECTOR, 'a[href="/openapi.json"]')
    assert link.is_displayed()
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe  # a style or script the policy blocked would be one
    asked = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            asked.add(message["params"]["request"]["url"])
    assert asked and all(u.startswith(base + "/") for u in asked), asked
