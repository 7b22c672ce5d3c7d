"""The browser of the browser tests: Debian's Chromium, headless, through its chromedriver.

The harness installs both when they are missing (as root, with apt-get, as it installs redis-server:
``harness.infra.chromium``). When they cannot be installed the tests that need the browser fail with the reason;
they are never skipped (tests/harness/test_chromium.py runs this fixture without a browser to hold it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from perfusion.errors import PerfusionError

WINDOW = (1280, 1000)


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium of Debian's, through its chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    from harness.infra.chromium import require_chromium

    failure = None
    try:
        install = require_chromium()
    except PerfusionError as exc:
        failure = str(exc)
    if failure is not None:
        pytest.fail(f"the browser test needs Chromium and chromedriver: {failure}", pytrace=False)
    options = Options()
    options.binary_location = install.browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # Chromium's sandbox refuses to run as root, as CI does
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=install.driver), options=options)
    try:
        yield driver
    finally:
        driver.quit()
