"""Debian's headless Chromium under selenium, as the browser tests and the console benchmark use it
(`apt-get install chromium chromium-driver`; `./dev.sh test` installs them)."""

from __future__ import annotations

import shutil
from typing import Any

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1440,1000",
]


class BrowserMissingError(RuntimeError):
    pass


def chromium() -> Any:
    """A fresh profile, its console and network logs kept (`driver.get_log("browser")`,
    `driver.get_log("performance")`)."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        raise BrowserMissingError(
            "chromium and chromium-driver are missing (apt-get install -y chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))
