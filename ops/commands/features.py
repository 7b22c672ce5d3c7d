"""``perfusion features apply|show``: the Feast feature repo in ``features/``."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "features",
        help="apply the Feast feature repo or show users' online features",
        description="The Feast repo in features/. Registry and stores live under $PERFUSION_STATE_DIR/feast; the "
        "online store is sqlite, or Redis with PERFUSION_ONLINE_STORE=redis (REDIS_URL or `perfusion redis up`).",
    )
    actions = parser.add_subparsers(dest="features_action", metavar="ACTION", required=True)
    actions.add_parser("apply", help="run `feast apply` on features/ and create the offline history files")
    show = actions.add_parser("show", help="print users' user_preferences features from the online store")
    show.add_argument("user_ids", nargs="+", help="user ids to look up")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ops.feature_table import format_feature_table
    from perfusion.feature_store import apply_feature_repo, open_feature_store, read_online_features

    if args.features_action == "apply":
        summary = apply_feature_repo()
        print(
            f"applied features/: entities {', '.join(summary.entities)}; feature views "
            f"{', '.join(summary.feature_views)}; online store {summary.online_store}; state in {summary.feast_dir}"
        )
        return 0
    rows = read_online_features(open_feature_store(), "user_preferences", args.user_ids)
    print(format_feature_table(rows))
    return 0
