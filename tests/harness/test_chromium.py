"""Chromium and chromedriver from Debian for the browser tests: found (installed with apt-get when missing, as root)
with one major version; a driver of another version refused with the fix; and the browser fixture failing, never
skipping, where they cannot be installed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.infra.chromium import require_chromium
from perfusion.errors import InfrastructureError


def test_chromium_and_its_driver_are_there_with_one_version() -> None:
    install = require_chromium()
    assert Path(install.browser).name == "chromium" and Path(install.driver).name == "chromedriver"
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", install.version)


def test_a_driver_of_another_major_version_is_refused_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_chromium()
    # A chromedriver left over from another install, found before Debian's.
    leftover = tmp_path / "chromedriver"
    leftover.write_text("#!/bin/sh\necho 'ChromeDriver 1.0.0.0 (an old download)'\n")
    leftover.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{Path('/usr/bin')}")
    with pytest.raises(InfrastructureError, match=r"ChromeDriver 1\.0\.0\.0 but .* install both from one source"):
        require_chromium()


def test_the_browser_fixture_fails_rather_than_skips_without_chromium(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Neither the browser nor apt-get to install it can be found.
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    pytester.makeconftest(Path(__file__).parents[1].joinpath("browser", "conftest.py").read_text())
    pytester.makepyfile(test_needs_a_browser="def test_needs_a_browser(browser):\n    assert browser\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*the browser test needs Chromium and chromedriver: 'chromium' is not on PATH; install it*apt-get install*"]
    )
