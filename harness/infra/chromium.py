"""Chromium and its WebDriver (chromedriver) from Debian, for driving the studio and the storefront in a browser.

:func:`require_chromium` finds ``chromium`` and ``chromedriver`` on PATH, installing Debian's ``chromium`` and
``chromium-driver`` with apt-get when one is missing and we are root (as Redis is installed,
:func:`~harness.infra.process.require_binary`), and checks that the driver speaks to this browser: chromedriver only
drives a Chromium of its own major version, and a mismatch would otherwise surface as an opaque session error.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from harness.infra.process import require_binary
from perfusion.errors import InfrastructureError

BROWSER_PACKAGE = "chromium"
DRIVER_PACKAGE = "chromium-driver"
_VERSION = re.compile(r"(\d+)\.\d+\.\d+\.\d+")


@dataclass(frozen=True)
class ChromiumInstall:
    """Where the browser and its driver are, and the version they share."""

    browser: str
    driver: str
    version: str


def require_chromium() -> ChromiumInstall:
    """Chromium and a chromedriver of the same major version; installs both from Debian when missing (as root)."""
    browser = require_binary("chromium", BROWSER_PACKAGE)
    driver = require_binary("chromedriver", DRIVER_PACKAGE)
    browser_version = _version_of(browser)
    driver_version = _version_of(driver)
    if browser_version.split(".")[0] != driver_version.split(".")[0]:
        raise InfrastructureError(
            f"{driver} is ChromeDriver {driver_version} but {browser} is Chromium {browser_version}; a driver drives "
            f"its own major version only: install both from one source (Debian: apt-get install -y {BROWSER_PACKAGE} "
            f"{DRIVER_PACKAGE})"
        )
    return ChromiumInstall(browser=browser, driver=driver, version=browser_version)


def _version_of(binary: str) -> str:
    """The ``major.minor.build.patch`` that ``binary --version`` prints."""
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InfrastructureError(f"{binary} --version did not answer ({exc}); reinstall it") from exc
    found = _VERSION.search(result.stdout)
    if result.returncode != 0 or found is None:
        output = (result.stdout + result.stderr).strip()[-300:]
        raise InfrastructureError(
            f"{binary} --version printed no version (exit {result.returncode}: {output!r}); reinstall it"
        )
    return found.group(0)
