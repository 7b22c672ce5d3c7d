"""Where the project keeps its state, caches and committed assets.

- ``PERFUSION_STATE_DIR`` (default ``<repo>/.state``): broker data and logs, Feast registry and stores, published
  model versions, generated images. Safe to delete; ``perfusion broker down`` does not delete it.
- ``PERFUSION_CACHE_DIR`` (default ``~/.cache/perfusion``): downloaded Kafka jars and the Python virtualenv,
  shared by every clone on the machine so that a fresh clone does not download them again.
- ``PERFUSION_ASSETS_DIR`` and ``PERFUSION_FEATURE_REPO``: the committed base model and the Feast repo. By default
  the source tree's ``assets/`` and ``features/``; an installed wheel carries both as data under
  ``<prefix>/share/perfusion/``, which is used when there is no source tree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# A wheel installs perfusion/ into <prefix>/lib/pythonX.Y/site-packages and its data files into <prefix>/share.
_PACKAGE_PARENTS = Path(__file__).resolve().parents
INSTALLED_DATA_DIR = (_PACKAGE_PARENTS[4] if len(_PACKAGE_PARENTS) > 4 else Path(sys.prefix)) / "share" / "perfusion"


def _data_folder(variable: str, name: str) -> Path:
    configured = os.environ.get(variable, "").strip()
    if configured:
        return Path(configured).resolve()
    in_source_tree = REPO_ROOT / name
    return in_source_tree if in_source_tree.is_dir() else INSTALLED_DATA_DIR / name


ASSETS_DIR = _data_folder("PERFUSION_ASSETS_DIR", "assets")
FEATURE_REPO_DIR = _data_folder("PERFUSION_FEATURE_REPO", "features")


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
