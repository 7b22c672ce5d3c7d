"""``perfusion features apply|show|merchant``: the Feast feature repo in ``features/``."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    from perfusion.feature_store import FeatureStoreSettings
    from perfusion.settings import add_flags

    parser = subparsers.add_parser(
        "features",
        help="apply the Feast feature repo, show viewers' online features, or register a merchant",
        description="The Feast repo in features/. Registry and stores live in one folder (--feast-dir, default "
        "$PERFUSION_STATE_DIR/feast); the online store is sqlite, or Redis with --online-store redis (REDIS_URL or "
        "`perfusion redis up`).",
    )
    add_flags(parser, FeatureStoreSettings)
    actions = parser.add_subparsers(dest="features_action", metavar="ACTION", required=True)
    actions.add_parser("apply", help="apply features/ to the store and create the offline history files")
    show = actions.add_parser(
        "show", help="print viewers' user_preferences features from the online store (merchants marked M)"
    )
    show.add_argument("user_ids", nargs="+", help="user ids to look up")
    merchant = actions.add_parser(
        "merchant", help="push merchants' profiles (merchant_profile): their u says they are merchants from now on"
    )
    merchant.add_argument("merchant_ids", nargs="+", help="merchant ids (the user_id their events carry)")
    merchant.add_argument(
        "--store-region", type=int, required=True, help="0..3, the region the merchants' stores sell in"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ops.feature_table import format_feature_table
    from perfusion.feature_store import (
        FeatureStoreSettings,
        apply_feature_repo,
        open_feature_store,
        read_online_features,
    )
    from perfusion.settings import flag_overrides

    settings = FeatureStoreSettings.from_env(**flag_overrides(args, FeatureStoreSettings))
    if args.features_action == "apply":
        summary = apply_feature_repo(settings)
        print(
            f"applied features/: entities {', '.join(summary.entities)}; feature views "
            f"{', '.join(summary.feature_views)}; feature services {', '.join(summary.feature_services)}; online "
            f"store {summary.online_store}; state in {summary.feast_dir}"
        )
        return 0
    if args.features_action == "merchant":
        return _push_merchants(settings, args.merchant_ids, args.store_region)
    store = open_feature_store(settings)
    rows = read_online_features(store, "user_preferences", args.user_ids)
    profiles = read_online_features(store, "merchant_profile", args.user_ids)
    print(format_feature_table(rows, {row["user_id"]: row["store_region"] for row in profiles}))
    return 0


def _push_merchants(settings: Any, merchant_ids: list[str], store_region: int) -> int:
    import time

    from perfusion.feature_store import FeaturePusher
    from perfusion.user_features import MERCHANT_PROFILE_PUSH, merchant_profile_rows

    # A bad region raises UserFeatureError (a PerfusionError: the CLI prints it) before anything is pushed.
    rows = merchant_profile_rows(dict.fromkeys(merchant_ids, store_region), signed_up_ts=time.time())
    FeaturePusher.open(settings).push(MERCHANT_PROFILE_PUSH, rows)
    print(f"pushed the merchant profiles of {', '.join(merchant_ids)} (store region {store_region})")
    return 0
