"""Components round-trip through safetensors + config.json; the model store publishes and switches atomically."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from perfusion.checkpoints import (
    CheckpointError,
    ModelStore,
    load_component,
    load_state_into,
    save_component,
)


def build_mlp(config: dict[str, Any]) -> nn.Module:
    return nn.Sequential(nn.Linear(config["width"], config["width"]), nn.ReLU(), nn.Linear(config["width"], 1))


def seeded_mlp(seed: int, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return build_mlp({"width": width})


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_component_round_trip(tmp_path: Path) -> None:
    module = seeded_mlp(0)
    folder = save_component(tmp_path, "mlp", module, {"width": 4})
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json"}
    loaded = load_component(tmp_path, "mlp", build_mlp)
    assert same_weights(module, loaded)
    assert json.loads((folder / "config.json").read_text()) == {"width": 4}


def test_load_state_into_swaps_weights_in_place(tmp_path: Path) -> None:
    save_component(tmp_path, "mlp", seeded_mlp(1), {"width": 4})
    target = seeded_mlp(2)
    parameter_before = next(target.parameters())
    load_state_into(tmp_path, "mlp", target)
    assert same_weights(target, seeded_mlp(1))
    assert next(target.parameters()) is parameter_before


def test_wrong_shapes_and_missing_components_are_refused(tmp_path: Path) -> None:
    save_component(tmp_path, "mlp", seeded_mlp(1, width=4), {"width": 4})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_state_into(tmp_path, "mlp", seeded_mlp(1, width=8))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_component(tmp_path, "absent", build_mlp)


def test_publish_verify_and_latest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.latest() is None and store.versions() == []
    first = store.publish({"mlp": (seeded_mlp(1), {"width": 4})}, {"metrics": {"gauc": 0.7}})
    second = store.publish({"mlp": (seeded_mlp(2), {"width": 4})}, {"metrics": {"gauc": 0.8}})
    assert (first, second) == ("v000001", "v000002")
    assert store.versions() == [first, second] and store.latest() == second
    manifest = store.verify(second)
    assert manifest["parent"] == first and manifest["metrics"] == {"gauc": 0.8}
    version, module = store.load("mlp", build_mlp)
    assert version == second and same_weights(module, seeded_mlp(2))
    assert not [p for p in tmp_path.rglob(".publish-*")]


def test_rollback_switches_latest_back(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first = store.publish({"mlp": (seeded_mlp(1), {"width": 4})}, {})
    store.publish({"mlp": (seeded_mlp(2), {"width": 4})}, {})
    store.rollback(first)
    assert store.latest() == first
    assert same_weights(store.load("mlp", build_mlp)[1], seeded_mlp(1))
    with pytest.raises(CheckpointError, match="does not exist"):
        store.rollback("v000009")


def test_corrupt_or_partial_versions_are_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    version = store.publish({"mlp": (seeded_mlp(1), {"width": 4})}, {})
    weights = store.path(version) / "mlp" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    with pytest.raises(CheckpointError, match="sha256"):
        store.verify(version)
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        store.verify(version)
    (store.path(version) / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="partial"):
        store.verify(version)
    with pytest.raises(CheckpointError, match="partial"):
        store.rollback(version)


def test_failed_publish_leaves_no_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    good = store.publish({"mlp": (seeded_mlp(1), {"width": 4})}, {})

    class Broken(nn.Module):
        def state_dict(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.publish({"mlp": (Broken(), {})}, {})
    assert store.versions() == [good] and store.latest() == good
    assert not [p for p in (tmp_path / "versions").iterdir() if p.name.startswith(".publish-")]


def test_concurrent_readers_see_a_whole_old_or_new_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.publish({"mlp": (seeded_mlp(0, width=16), {"width": 16})}, {"round": 0})
    errors: list[BaseException] = []
    seen: set[str] = set()
    done = threading.Event()

    def read() -> None:
        reader = ModelStore(tmp_path)
        while not done.is_set():
            try:
                version = reader.latest()
                assert version is not None
                reader.verify(version)
                reader.load("mlp", build_mlp, version=version)
                seen.add(version)
            except BaseException as exc:  # collected and re-raised in the test thread
                errors.append(exc)
                return

    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers:
        thread.start()
    for round_ in range(1, 8):
        version = store.publish({"mlp": (seeded_mlp(round_, width=16), {"width": 16})}, {"round": round_})
        deadline = time.monotonic() + 5.0
        while version not in seen and time.monotonic() < deadline and not errors:
            time.sleep(0.001)
    done.set()
    for thread in readers:
        thread.join()
    assert not errors, errors[0]
    assert len(seen) >= 7
