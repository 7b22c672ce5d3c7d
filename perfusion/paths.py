"""Where the project keeps its state, caches and committed assets.

- ``PERFUSION_STATE_DIR`` (default ``<repo>/.state``): broker data and logs, Feast registry and stores, published
  model versions, generated images. Safe to delete; ``perfusion broker down`` does not delete it.
- ``PERFUSION_CACHE_DIR`` (default ``~/.cache/perfusion``): downloaded Kafka jars and the Python virtualenv,
  shared by every clone on the machine so that a fresh clone does not download them again.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"
FEATURE_REPO_DIR = REPO_ROOT / "features"


def state_dir() -> Path:
    """The folder for runtime state (created on first use)."""
    path = Path(os.environ.get("PERFUSION_STATE_DIR", REPO_ROOT / ".state")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """The machine-wide cache folder (created on first use)."""
    default = Path.home() / ".cache" / "perfusion"
    path = Path(os.environ.get("PERFUSION_CACHE_DIR", default)).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
