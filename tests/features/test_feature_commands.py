"""``perfusion features merchant|show`` on a real Feast store, and the terminal table of viewers' features."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.cli import main
from ops.feature_table import format_feature_table
from perfusion.attributes import DESCRIPTOR_DIM


def preference_row(user_id: str, selected: int, reviewed: int) -> dict[str, object]:
    row: dict[str, object] = {
        f"{kind}_{window}": 1
        for kind in ("impressions", "clicks", "orders", "returns")
        for window in ("1h", "1d", "total")
    }
    preference = [0.0] * DESCRIPTOR_DIM
    preference[0] = 1.0
    row.update(
        user_id=user_id,
        images_shown_total=4,
        images_reviewed_total=reviewed,
        images_selected_total=selected,
        ctr=0.25,
        cvr=1.0,
        preference=preference,
        last_active_ts=1_700_000_000.0,
    )
    return row


def test_the_table_marks_merchants_and_shows_their_selections() -> None:
    table = format_feature_table(
        [preference_row("shop-1", selected=1, reviewed=4), preference_row("shopper-1", 0, 0), {"user_id": "new"}],
        {"shop-1": 2, "shopper-1": None},
    )
    lines = table.splitlines()
    assert "sel/rev" in lines[0]
    assert lines[2].startswith("shop-1 M ") and " 1/4 " in lines[2] and "t-shirt 1.00" in lines[2]
    assert lines[3].startswith("shopper-1 ") and " 0/0 " in lines[3]
    assert lines[4] == f"{'new':<14} (no features yet)"


@pytest.mark.slow
def test_merchant_command_pushes_profiles_that_show_marks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("PERFUSION_FEAST_DIR", "")
    monkeypatch.setenv("PERFUSION_ONLINE_STORE", "sqlite")
    assert main(["features", "apply"]) == 0
    assert "merchant_profile" in capsys.readouterr().out
    assert main(["features", "merchant", "shop-1", "shop-2", "--store-region", "3"]) == 0
    assert "shop-1, shop-2 (store region 3)" in capsys.readouterr().out
    assert main(["features", "merchant", "shop-3", "--store-region", "9"]) == 2
    assert "store_region must be an integer in 0..3, got 9" in capsys.readouterr().err

    from perfusion.feature_store import open_feature_store, read_online_features

    profiles = read_online_features(open_feature_store(), "merchant_profile", ["shop-1", "shop-3"])
    assert [row["store_region"] for row in profiles] == [3, None]
    assert main(["features", "show", "shop-1", "someone"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[2].startswith("shop-1 M ") and "(no features yet)" in shown[2]
    assert shown[3].startswith("someone ")
