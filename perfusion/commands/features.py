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
    from streams.feature_push import apply_feature_repo, open_feature_store, read_online_features

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


def format_feature_table(rows: list[dict[str, Any]]) -> str:
    """One line per user: counts as impressions/clicks/orders/returns per window, rates, top preferences."""
    from datetime import UTC, datetime

    from perfusion.attributes import ATTRIBUTE_KINDS, descriptor_blocks

    header = (
        f"{'user':<12} {'last active (UTC)':<20} {'imp 1h/1d/all':>14} {'clk 1h/1d/all':>14} {'ord 1h/1d/all':>14} "
        f"{'ret all':>7} {'ctr':>6} {'cvr':>6}  strongest preferences"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        if row.get("last_active_ts") is None:
            lines.append(f"{row['user_id']:<12} (no features yet)")
            continue
        active = datetime.fromtimestamp(row["last_active_ts"], tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        blocks = descriptor_blocks(list(row["preference"]))
        liked = []
        for kind, values in ATTRIBUTE_KINDS.items():
            weights = blocks[kind]
            best = max(range(len(values)), key=weights.__getitem__)
            if weights[best] > 0:
                liked.append(f"{values[best]} {weights[best]:.2f}")

        lines.append(
            f"{row['user_id']:<12} {active:<20} {_windows(row, 'impressions'):>14} {_windows(row, 'clicks'):>14} "
            f"{_windows(row, 'orders'):>14} {row['returns_total']:>7} {row['ctr']:>6.3f} {row['cvr']:>6.3f}  "
            f"{', '.join(liked) or '-'}"
        )
    return "\n".join(lines)


def _windows(row: dict[str, Any], kind: str) -> str:
    return f"{row[f'{kind}_1h']}/{row[f'{kind}_1d']}/{row[f'{kind}_total']}"
