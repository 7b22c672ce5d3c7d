"""Self-describing checkpoints and a versioned model store with an atomically switched LATEST pointer.

A *component* is one module saved as ``<folder>/<name>/model.safetensors`` beside ``<folder>/<name>/config.json``
(whatever the builder needs to allocate the module again). No pickles anywhere.

A :class:`ModelStore` keeps published versions under ``<root>/versions/<version>/``, each holding its components
and a ``manifest.json`` with the sha256 of every file. Publishing writes into a temporary folder, fsyncs it and
renames it into place; LATEST is then switched by an atomic rename of a temporary file. A reader that follows
LATEST therefore sees either the old or the new version, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from perfusion.errors import PerfusionError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
VERSION_PATTERN = re.compile(r"^v(\d{6,})$")


class CheckpointError(PerfusionError):
    """A checkpoint or model version is missing, partial or corrupt."""


def save_component(folder: Path, name: str, module: torch.nn.Module, config: Mapping[str, Any]) -> Path:
    """Write ``module``'s state dict and ``config`` to ``folder/name``; returns that folder."""
    target = Path(folder) / name
    target.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; clone each tensor into its own buffer.
    state = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in module.state_dict().items()}
    save_file(state, str(target / WEIGHTS_FILE))
    (target / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return target


def read_component_config(folder: Path, name: str) -> dict[str, Any]:
    path = Path(folder) / name / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; was component {name!r} saved into {folder}?")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); save the component again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def read_component_state(folder: Path, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(folder) / name / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; was component {name!r} saved into {folder}?")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read as safetensors ({exc}); the file is corrupt") from None


def load_state_into(folder: Path, name: str, module: torch.nn.Module) -> torch.nn.Module:
    """Load ``folder/name`` weights into an already allocated module in place (shapes must match)."""
    device = next(iter(module.parameters()), torch.empty(0)).device
    state = read_component_state(folder, name, device=device)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {Path(folder) / name} do not fit the module: {exc}") from None
    return module


def load_component(
    folder: Path, name: str, build: Callable[[dict[str, Any]], torch.nn.Module], device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Allocate the module from its config.json with ``build`` and load its weights."""
    module = build(read_component_config(folder, name)).to(device)
    return load_state_into(folder, name, module)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync_path(path)
    _fsync_path(folder)


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class ModelStore:
    """Published model versions under ``root/versions``; ``root/LATEST`` names the one generators serve."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.versions_dir.mkdir(parents=True, exist_ok=True)

    def path(self, version: str) -> Path:
        if not VERSION_PATTERN.match(version):
            raise CheckpointError(f"version names look like v000001; got {version!r}")
        return self.versions_dir / version

    def versions(self) -> list[str]:
        """Published versions, oldest first (temporary folders of unfinished publishes are not listed)."""
        names = [p.name for p in self.versions_dir.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)]
        return sorted(names, key=lambda name: int(name[1:]))

    def latest(self) -> str | None:
        pointer = self.root / LATEST_FILE
        try:
            version = pointer.read_text().strip()
        except FileNotFoundError:
            return None
        return version or None

    def publish(
        self, components: Mapping[str, tuple[torch.nn.Module, Mapping[str, Any]]], manifest: Mapping[str, Any]
    ) -> str:
        """Write a new version with these components and switch LATEST to it; returns the version name."""
        if not components:
            raise CheckpointError("publish needs at least one component")
        staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=self.versions_dir))
        try:
            for name, (module, config) in components.items():
                save_component(staging, name, module, config)
            files = {
                str(path.relative_to(staging)): _sha256(path) for path in sorted(staging.rglob("*")) if path.is_file()
            }
            full_manifest = {
                **dict(manifest),
                "components": sorted(components),
                "files": files,
                "created_ts": time.time(),
                "parent": self.latest(),
            }
            (staging / MANIFEST_FILE).write_text(json.dumps(full_manifest, indent=2, sort_keys=True) + "\n")
            _fsync_tree(staging)
            version = self._rename_into_place(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._point_latest_to(version)
        return version

    def _rename_into_place(self, staging: Path) -> str:
        existing = self.versions()
        number = int(existing[-1][1:]) + 1 if existing else 1
        while True:
            version = f"v{number:06d}"
            try:
                # rename(2) onto an existing non-empty folder fails, so concurrent publishers never share a name.
                os.rename(staging, self.versions_dir / version)
            except OSError:
                if not (self.versions_dir / version).exists():
                    raise
                number += 1
                continue
            _fsync_path(self.versions_dir)
            return version

    def _point_latest_to(self, version: str) -> None:
        descriptor, temp_name = tempfile.mkstemp(prefix=".LATEST-", dir=self.root)
        try:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(version + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, self.root / LATEST_FILE)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        _fsync_path(self.root)

    def manifest(self, version: str) -> dict[str, Any]:
        path = self.path(version) / MANIFEST_FILE
        if not path.is_file():
            raise CheckpointError(f"version {version} has no {MANIFEST_FILE} in {self.path(version)}; it is partial")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); the version is corrupt") from None
        if not isinstance(manifest, dict) or "files" not in manifest or "components" not in manifest:
            raise CheckpointError(f"{path} lacks 'files' or 'components'; the version is corrupt")
        return manifest

    def verify(self, version: str) -> dict[str, Any]:
        """Check that the manifest lists every file, each present with its checksum and loadable; return it."""
        folder = self.path(version)
        if not folder.is_dir():
            raise CheckpointError(
                f"version {version} does not exist under {self.versions_dir}; known: {self.versions()}"
            )
        manifest = self.manifest(version)
        for relative, expected in manifest["files"].items():
            path = folder / relative
            if not path.is_file():
                raise CheckpointError(f"version {version} is partial: {relative} is missing")
            if _sha256(path) != expected:
                raise CheckpointError(f"version {version} is corrupt: {relative} does not match its sha256")
        for name in manifest["components"]:
            read_component_config(folder, name)
            read_component_state(folder, name)
        return manifest

    def rollback(self, version: str) -> None:
        """Point LATEST at an earlier (verified) version."""
        self.verify(version)
        self._point_latest_to(version)

    def load(
        self,
        name: str,
        build: Callable[[dict[str, Any]], torch.nn.Module],
        version: str | None = None,
        device: str | torch.device = "cpu",
    ) -> tuple[str, torch.nn.Module]:
        """Load a component of ``version`` (default: LATEST); returns (version, module)."""
        version = version or self.latest()
        if version is None:
            raise CheckpointError(f"no version is published under {self.root}; publish one or pass a version")
        return version, load_component(self.path(version), name, build, device=device)
