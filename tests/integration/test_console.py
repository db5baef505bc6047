"""The web console at `/` in a real browser (Debian's headless Chromium under selenium) against real
processes on loopback: it loads with no console errors and asks nothing of any other origin, runs
an example from the URL to the same answer as the JSON API, shows `coarse` before `final`, runs a
drawing, a chosen and a dropped image file, and, with one member SIGSTOPped, shows that member decoded and
its replica down. The screenshots in docs/ come from these tests (COINSERVE_SCREENSHOTS=docs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.integration.conftest import Public

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
WAIT_S = 30
PAUSED = "member-1"


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: COINSERVE_SCREENSHOTS (docs/ to refresh the README's), else a temp folder."""
    given = os.environ.get("COINSERVE_SCREENSHOTS")
    return Path(given) if given else tmp_path_factory.mktemp("screenshots")


def wait(driver, condition, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def by_testid(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'[data-testid="{name}"]')


def attr(driver, name: str, attribute: str) -> str | None:
    """An attribute of the element with `data-testid=name`, read in one script (the cluster panel is
    redrawn every second, so a found element may be replaced before it is read); None if absent."""
    script = (
        "const e = document.querySelector(`[data-testid='${arguments[0]}']`); return e && e.getAttribute(arguments[1]);"
    )
    return driver.execute_script(script, name, attribute)


def final_of(driver) -> tuple[str, str, int]:
    """(text, data-state, data-index) of `final-label` once it holds a final answer or an error."""
    wait(driver, lambda d: attr(d, "final-label", "data-state") in {"exact", "approximate", "error"})
    label = by_testid(driver, "final-label")
    return label.text, label.get_attribute("data-state"), int(label.get_attribute("data-index") or -1)


def events_of(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [li.get_attribute("data-event") for li in by_testid(driver, "event-log").find_elements(By.TAG_NAME, "li")]


def screenshot(driver, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def examples_json(public: Public) -> dict:
    return httpx.get(f"{public.service.url}/v1/examples", timeout=10).json()


def json_answer(public: Public, inputs: list[dict]) -> dict:
    """The JSON API's answer for the same input, retried until it is exact (a cold start may decode)."""
    for _ in range(10):
        url = f"{public.service.url}/v2/models/fashion/infer"
        body = httpx.post(url, json={"inputs": inputs}, timeout=30).json()
        if not body["parameters"]["approximate"]:
            return body
    pytest.fail(f"no exact answer from the JSON API in 10 tries: {body['parameters']}")


def test_examples_are_the_bundles_own(public: Public, coded_bundle: Path):
    body = examples_json(public)
    stored = load_file(str(coded_bundle / "examples.safetensors"))
    assert len(body["examples"]) == len(stored["inputs"]) == 8
    assert body["input"] == {"name": "input", "shape": [1, 28, 28], "datatype": "FP32", "range": [0.0, 1.0]}
    assert len(body["labels"]) == 10
    for example, x, label in zip(body["examples"], stored["inputs"], stored["labels"], strict=True):
        (tensor,) = example["inputs"]
        assert tensor["shape"] == [1, 1, 28, 28] and tensor["name"] == "input"
        np.testing.assert_array_equal(np.asarray(tensor["data"], np.float32), x.ravel())
        assert example["label"] == int(label) and example["label_name"] == body["labels"][int(label)]


def test_status_lists_every_replica_with_its_recent_calls(public: Public):
    examples = examples_json(public)["examples"]
    json_answer(public, examples[0]["inputs"])
    status = httpx.get(f"{public.service.url}/v1/status", timeout=10).json()
    replicas = {r["name"]: r for r in status["replicas"]}
    assert set(replicas) == {"member-0", "member-1", "member-2", "coded-coin-0"}
    assert status["ready"] is True and status["decode_policy"] == "patient" and status["group"] == "fashion"
    for name, replica in replicas.items():
        assert replica["role"] == ("coded" if name == "coded-coin-0" else "member")
        assert replica["ready"] is True and replica["reason"] is None
        # a coded call is held, and never sent when every (warm) member answers in time (issue 27)
        assert replica["calls"] + replica["cut"] >= (0 if name == "coded-coin-0" else 1)
        if replica["calls"]:
            assert 0 < replica["p50_ms"] <= replica["p99_ms"]
    for member in ("member-0", "member-1", "member-2"):  # the exact answer above waited for each
        assert replicas[member]["calls"] >= 1
    assert all(replicas[m]["patience_ms"] > 0 and replicas[m]["decoded"] >= 0 for m in ("member-0", "member-1"))
    assert "patience_ms" not in replicas["coded-coin-0"]


def test_the_console_loads_clean_and_talks_only_to_its_own_origin(browser, public: Public, shots: Path):
    base = public.service.url
    browser.get_log("browser"), browser.get_log("performance")  # drop what earlier tests left
    browser.get(base + "/")
    wait(browser, lambda d: attr(d, "replica-member-0", "data-ready") == "true")
    wait(browser, lambda d: by_testid(d, "example-7"))
    by_testid(browser, "example-3").click()
    text, state, index = final_of(browser)
    assert state in {"exact", "approximate"} and text == examples_json(public)["labels"][index]
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe
    asked = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            asked.add(message["params"]["request"]["url"])
    assert asked and all(u.startswith((base + "/", "data:", "blob:")) for u in asked), asked
    assert {base + "/", base + "/console/console.js", base + "/v1/status", base + "/v1/examples"} <= asked


def test_the_replica_cards_say_what_happened_in_plain_words(browser, public: Public):
    """Issue 29: counts as people write them, periods in words, no jargon ("p50", "final came
    first"): a member's card after answered requests reads like a sentence."""
    import re

    browser.get(public.service.url + "/")
    wait(browser, lambda d: by_testid(d, "example-3"))
    by_testid(browser, "example-3").click()
    final_of(browser)
    script = "const e = document.querySelector(`[data-testid='replica-member-0']`); return e ? e.innerText : '';"
    wait(browser, lambda d: re.search(r"requests? in the last minute", d.execute_script(script)))
    text = browser.execute_script(script)
    assert re.search(r"\b[\d,]+ requests? in the last minute", text), text
    assert re.search(r"typically [\d.,]+ ms, 99 in 100 within [\d.,]+ ms", text), text
    assert "p50" not in text and "60 s" not in text and "final came first" not in text, text


def test_an_example_from_the_url_gets_the_json_apis_answer(browser, public: Public, shots: Path):
    example = examples_json(public)["examples"][0]
    expected = json_answer(public, example["inputs"])
    ensemble = expected["outputs"][-1]
    for _ in range(5):  # until the page's own answer is exact too (a cold start may decode a member)
        browser.get(public.service.url + "/?example=0")
        text, state, index = final_of(browser)
        if state == "exact":
            break
    assert state == "exact", "no exact answer on the page in 5 loads"
    assert index == int(np.argmax(ensemble["data"])) and text == examples_json(public)["labels"][index]
    events = events_of(browser)
    assert events[0] == "coarse" and events[-1] == "final" and events.count("final") == 1, events
    for member in ("member-0", "member-1", "member-2"):
        assert attr(browser, f"member-{member}", "data-state") == "exact"
    assert attr(browser, "replica-coded-coin-0", "data-ready") == "true"
    screenshot(browser, shots / "console-healthy.png")


PAD = "document.getElementById('pad').getContext('2d')"
PIXEL = f"return Array.from({PAD}.getImageData(arguments[0], arguments[1], 1, 1).data)"
LIT = f"return {PAD}.getImageData(0, 0, 224, 224).data.filter((v, i) => i % 4 === 0 && v > 128).length"
DROP = """
const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
const files = new DataTransfer();
files.items.add(new File([bytes], "shirt.png", {type: "image/png"}));
const drop = new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true});
document.getElementById("pad").dispatchEvent(drop);
"""


def test_a_drawing_a_chosen_file_and_a_dropped_file_are_answered(browser, public: Public, tmp_path: Path):
    import base64

    from PIL import Image, ImageDraw
    from selenium.webdriver.common.action_chains import ActionChains

    labels = examples_json(public)["labels"]
    browser.get(public.service.url + "/")
    wait(browser, lambda d: by_testid(d, "example-0"))  # the examples are in: the pad is shown and live
    pad = by_testid(browser, "draw-pad")
    assert pad.is_displayed()
    chain = ActionChains(browser).move_to_element_with_offset(pad, -40, -40).click_and_hold()
    chain.move_by_offset(60, 20).move_by_offset(10, 50).release().perform()
    assert browser.execute_script(LIT) > 1000  # a stroke ~19 px wide, ~170 px long
    by_testid(browser, "run-drawing").click()
    text, state, index = final_of(browser)
    assert state != "error" and text == labels[index], by_testid(browser, "answer-meta").text
    # a dark shirt on a white background, as a photo would be: fitted (224×168 at y 28), inverted to
    # the examples' dark background
    picture = Image.new("RGB", (120, 90), "white")
    ImageDraw.Draw(picture).rectangle((30, 10, 90, 80), fill=(20, 20, 20))
    picture.save(tmp_path / "shirt.png")
    for how in ("file input", "drop"):
        browser.find_element("id", "clear-pad").click()
        assert browser.execute_script(LIT) == 0
        if how == "file input":
            by_testid(browser, "file-input").send_keys(str(tmp_path / "shirt.png"))
        else:
            browser.execute_script(DROP, base64.b64encode((tmp_path / "shirt.png").read_bytes()).decode())
        wait(browser, lambda d: d.execute_script(PIXEL, 112, 112)[0] > 200)  # the shirt, now light
        assert browser.execute_script(PIXEL, 5, 40)[0] < 30, how  # the photo's white background, now dark
        assert browser.execute_script(PIXEL, 1, 1)[:3] == [0, 0, 0]  # the pad around it
        by_testid(browser, "run-drawing").click()
        text, state, index = final_of(browser)
        assert state != "error" and text == labels[index], (how, by_testid(browser, "answer-meta").text)


def test_a_paused_member_is_decoded_and_its_replica_goes_down(browser, public: Public, shots: Path):
    service = public.service
    browser.get(service.url + "/")
    wait(browser, lambda d: attr(d, f"replica-{PAUSED}", "data-ready") == "true")
    service.signal(PAUSED, signal.SIGSTOP)
    try:
        started = time.monotonic()
        browser.get(service.url + "/?example=1")
        text, state, _ = final_of(browser)
        assert state == "approximate", by_testid(browser, "answer-meta").text
        assert attr(browser, f"member-{PAUSED}", "data-state") == "decoded"
        assert attr(browser, "member-member-0", "data-state") == "exact"
        window = httpx.get(f"{service.url}/v1/status", timeout=10).json()["health"]["window_s"] + 5
        wait(browser, lambda d: attr(d, f"replica-{PAUSED}", "data-ready") == "false", timeout=window)
        down_after = time.monotonic() - started
        assert attr(browser, "replica-member-0", "data-ready") == "true"
        assert attr(browser, "gateway-state", "data-ready") == "true"  # the coded replica covers it
        browser.get(service.url + "/?example=1")  # the panel says why, next to an answer with it decoded
        final_of(browser)
        wait(browser, lambda d: attr(d, f"replica-{PAUSED}", "data-ready") == "false")
        screenshot(browser, shots / "console-paused.png")
        print(f"{PAUSED} shown down {down_after:.1f} s after SIGSTOP (window {window:.0f} s)")
    finally:
        service.signal(PAUSED, signal.SIGCONT)
        until_ready(public)


def until_ready(public: Public, timeout_s: float = 60) -> None:
    stop = time.monotonic() + timeout_s
    while time.monotonic() < stop:
        body = httpx.get(f"{public.service.url}/v2/health/ready", timeout=5).json()
        if body.get("down") == []:
            return
        time.sleep(0.2)
    pytest.fail(f"the cluster did not come back: {body}")


@pytest.fixture(scope="module", autouse=True)
def _cluster_left_whole(public: Public) -> Iterator[None]:
    yield
    until_ready(public)


def test_the_console_benchmark_runs_quick(public: Public, tmp_path: Path):
    """bench/console.py --quick against this cluster (the full run writes docs/results/console.json):
    every click reaches a final, the raw clicks and trials are kept, and each arm's ratio is there."""
    out = tmp_path / "console.json"
    command = [sys.executable, "-m", "bench.console", "--quick", "--url", public.service.url, "--json", str(out)]
    subprocess.run(command, check=True, timeout=240)
    report = json.loads(out.read_text())
    clicks = report["click_to_final"]
    assert clicks["clicks"] == len(clicks["raw"]) == 8 and clicks["errors"] == 0
    assert all(0 < row["page_ms"] <= row["selenium_ms"] for row in clicks["raw"])
    cost = report["status_cost"]
    assert {t["arm"] for t in cost["trials"]} == {"none", "poll", "console"}
    assert all(t["ok_per_s"] > 0 for t in cost["trials"]) and cost["poll_ratio"]["median"] > 0
    assert report["machine"]["cpu"] and report["url"] == public.service.url
