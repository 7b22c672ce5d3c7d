"""Viewers' online features as a table for the terminal (``perfusion features show`` and the demo)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def format_feature_table(rows: list[dict[str, Any]], store_regions: Mapping[str, int | None] | None = None) -> str:
    """One line per viewer: counts as impressions/clicks/orders/returns per window, a merchant's selected/reviewed
    images, rates, top preferences. ``store_regions`` (merchant id -> store region, from ``merchant_profile``) marks
    merchants with an ``M`` after their id."""
    from datetime import UTC, datetime

    from perfusion.attributes import ATTRIBUTE_KINDS, descriptor_blocks

    merchants = {user_id for user_id, region in (store_regions or {}).items() if region is not None}
    header = (
        f"{'viewer':<14} {'last active (UTC)':<20} {'imp 1h/1d/all':>14} {'clk 1h/1d/all':>14} {'ord 1h/1d/all':>14} "
        f"{'ret all':>7} {'sel/rev':>9} {'ctr':>6} {'cvr':>6}  strongest preferences"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        name = f"{row['user_id']}{' M' if row['user_id'] in merchants else ''}"
        if row.get("last_active_ts") is None:
            lines.append(f"{name:<14} (no features yet)")
            continue
        active = datetime.fromtimestamp(row["last_active_ts"], tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        blocks = descriptor_blocks(list(row["preference"]))
        liked = []
        for kind, values in ATTRIBUTE_KINDS.items():
            weights = blocks[kind]
            best = max(range(len(values)), key=weights.__getitem__)
            if weights[best] > 0:
                liked.append(f"{values[best]} {weights[best]:.2f}")
        selected = f"{row.get('images_selected_total') or 0}/{row.get('images_reviewed_total') or 0}"
        lines.append(
            f"{name:<14} {active:<20} {_windows(row, 'impressions'):>14} {_windows(row, 'clicks'):>14} "
            f"{_windows(row, 'orders'):>14} {row['returns_total']:>7} {selected:>9} {row['ctr']:>6.3f} "
            f"{row['cvr']:>6.3f}  {', '.join(liked) or '-'}"
        )
    return "\n".join(lines)


def _windows(row: dict[str, Any], kind: str) -> str:
    return f"{row[f'{kind}_1h']}/{row[f'{kind}_1d']}/{row[f'{kind}_total']}"
