"""A wheel of the project installs and runs outside the source tree: the CLI reports its version, and the committed
base model and the Feast repo are found as the wheel's data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from ops.cli import build_parser, installed_version
from perfusion.paths import REPO_ROOT


def test_version_flag_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"perfusion {installed_version()}"


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_finds_its_model_and_feature_repo(tmp_path: Path) -> None:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout.split(
        b"\0"
    )
    source = tmp_path / "source"
    for name in filter(None, (entry.decode() for entry in tracked)):
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("perfusion-*.whl")
    prefix = tmp_path / "prefix"
    # --ignore-installed: install beside, never uninstall, the project installed in this environment (editable).
    subprocess.run(
        [*pip, "install", "--no-deps", "--ignore-installed", "--prefix", str(prefix), str(wheel)], check=True
    )
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    shutil.rmtree(source)  # nothing of the source tree is left to fall back on

    # The installed packages come first; their dependencies from this interpreter's environment.
    env = {**os.environ, "PYTHONPATH": str(purelib)}
    env.pop("PERFUSION_ASSETS_DIR", None)
    env.pop("PERFUSION_FEATURE_REPO", None)
    probe = (
        "from perfusion.paths import ASSETS_DIR, FEATURE_REPO_DIR; import perfusion; "
        "print(perfusion.__file__); print(ASSETS_DIR); print(FEATURE_REPO_DIR)"
    )
    printed = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    package_file, assets, feature_repo = (Path(line) for line in printed[:3])
    assert package_file.is_relative_to(purelib)
    assert assets == (prefix / "share" / "perfusion" / "assets").resolve()
    assert (assets / "base" / "unet" / "model.safetensors").stat().st_size > 1_000_000
    assert (assets / "base" / "reward_towers" / "config.json").is_file()
    assert (feature_repo / "feature_store.yaml").is_file() and (feature_repo / "definitions.py").is_file()

    version = subprocess.run(
        [sys.executable, "-m", "ops", "--version"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == "perfusion 0.1.0"
