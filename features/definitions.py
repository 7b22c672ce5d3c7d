"""Entities, sources and feature views of the PerFusion feature repo (imported by `feast apply`).

- ``user_preferences``: the preference agent's per-viewer counters, rates and preference vector (shoppers and
  merchants alike), pushed as a stream through ``user_preferences_push``; the generator reads them online, the
  trainer as of impression time offline.
- ``user_profile``: slowly changing shopper attributes (age group, region), pushed through ``user_profile_push``.
- ``merchant_profile``: what the shop knows of a merchant at sign-up (the region their store sells in), pushed
  through ``merchant_profile_push``; a viewer with a merchant profile is a merchant (perfusion.user_features).

The user vector u reads the all-time counters, the preference vector and the profiles (perfusion.user_features);
the windowed counts, ``ctr``, ``cvr`` and ``last_active_ts`` are for people and monitoring.

Offline history is parquet under ``$PERFUSION_FEAST_DIR/offline`` (never inside this folder).
"""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float32, Float64, Int64

# Length of a descriptor (perfusion.attributes.DESCRIPTOR_DIM); this repo imports feast only, so a test checks
# that the two agree.
DESCRIPTOR_DIM = 26

if not os.environ.get("PERFUSION_FEAST_DIR"):
    raise RuntimeError("PERFUSION_FEAST_DIR is not set; run `perfusion features apply` (it sets it to <state>/feast)")
OFFLINE_DIR = Path(os.environ["PERFUSION_FEAST_DIR"]) / "offline"

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="a shopper or merchant")
design = Entity(name="design", join_keys=["design_id"], value_type=ValueType.STRING, description="a text design")

user_preferences_history = FileSource(
    name="user_preferences_history",
    path=str(OFFLINE_DIR / "user_preferences.parquet"),
    timestamp_field="event_timestamp",
)
user_preferences_push = PushSource(name="user_preferences_push", batch_source=user_preferences_history)

_COUNTS = [
    Field(name=f"{kind}_{window}", dtype=Int64, description=f"{kind} in the last {window} of event time")
    for kind in ("impressions", "clicks", "orders", "returns")
    for window in ("1h", "1d", "total")
]

user_preferences = FeatureView(
    name="user_preferences",
    entities=[user],
    ttl=timedelta(0),  # 0 = no expiry: a user's latest features stay valid until the next push
    schema=[
        *_COUNTS,
        Field(name="images_shown_total", dtype=Int64, description="candidates of every impression shown, all time"),
        Field(
            name="images_reviewed_total",
            dtype=Int64,
            description="candidates of the impressions the viewer selected from (a merchant's reviews), all time",
        ),
        Field(name="images_selected_total", dtype=Int64, description="candidates selected in them, all time"),
        Field(
            name="ctr",
            dtype=Float32,
            description="clicks per image shown outside the viewer's reviews, all time; 0 before any",
        ),
        Field(name="cvr", dtype=Float32, description="orders / clicks, all time; 0 without clicks"),
        Field(
            name="preference",
            dtype=Array(Float32),
            description=f"recency-weighted attribute descriptor of liked images, length {DESCRIPTOR_DIM}",
        ),
        Field(name="last_active_ts", dtype=Float64, description="latest event time, seconds since the epoch"),
    ],
    source=user_preferences_push,
    online=True,
    tags={"writer": "streams.agents.preferences"},
)

user_profile_history = FileSource(
    name="user_profile_history",
    path=str(OFFLINE_DIR / "user_profile.parquet"),
    timestamp_field="event_timestamp",
)
user_profile_push = PushSource(name="user_profile_push", batch_source=user_profile_history)

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="age_group", dtype=Int64, description="0..4, youngest to oldest"),
        Field(name="region", dtype=Int64, description="0..3"),
    ],
    source=user_profile_push,
    online=True,
)

merchant_profile_history = FileSource(
    name="merchant_profile_history",
    path=str(OFFLINE_DIR / "merchant_profile.parquet"),
    timestamp_field="event_timestamp",
)
merchant_profile_push = PushSource(name="merchant_profile_push", batch_source=merchant_profile_history)

merchant_profile = FeatureView(
    name="merchant_profile",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        # Not "region": Feast names features without their view, so two views may not share a name.
        Field(name="store_region", dtype=Int64, description="0..3, the region the merchant's store sells in"),
    ],
    source=merchant_profile_push,
    online=True,
)
