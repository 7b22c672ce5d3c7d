"""``perfusion models list|rollback VERSION``: the published model versions and the LATEST pointer."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list published model versions or roll LATEST back to one",
        description="Published versions live under <state>/models/versions; LATEST names the one generator "
        "services serve (they follow it within a second, without a restart).",
    )
    parser.add_argument("--models", type=Path, default=None, help="model store folder (default: <state>/models)")
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION", required=True)
    actions.add_parser("list", help="versions, oldest first, with their metrics; * marks LATEST")
    rollback = actions.add_parser("rollback", help="verify VERSION and point LATEST at it")
    rollback.add_argument("version", help="a published version, e.g. v000003")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from perfusion.checkpoints import CheckpointError, ModelStore
    from perfusion.paths import state_dir

    store = ModelStore(args.models or state_dir() / "models")
    if args.models_action == "rollback":
        before = store.latest()
        store.rollback(args.version)
        print(f"LATEST: {before} -> {args.version}")
        return 0
    latest = store.latest()
    versions = store.versions()
    if not versions:
        print(f"no published versions under {store.root}; the service serves the base model")
        return 0
    for version in versions:
        marker = "*" if version == latest else " "
        try:
            manifest = store.manifest(version)
        except CheckpointError as exc:
            print(f"{marker} {version}  unreadable: {exc}")
            continue
        created = datetime.datetime.fromtimestamp(float(manifest.get("created_ts", 0)), tz=datetime.UTC)
        metrics = manifest.get("metrics", {})
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, int | float))
        components = ",".join(manifest.get("components", []))
        print(f"{marker} {version}  {created:%Y-%m-%d %H:%M:%S}Z  [{components}]  {shown}")
    return 0
