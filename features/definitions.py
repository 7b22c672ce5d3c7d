"""Entities, sources, feature views and feature services of the PerFusion feature repo (read by
``perfusion.feature_store.apply_feature_repo`` and by the ``feast`` CLI run in this folder).

- ``user_preferences``: the preference agent's per-viewer counters, rates and preference vector (shoppers and
  merchants alike), pushed as a stream through ``user_preferences_push``; the generator reads them online, the
  trainer as of impression time offline.
- ``user_profile``: slowly changing shopper attributes (age group, region), pushed through ``user_profile_push``.
- ``merchant_profile``: what the shop knows of a merchant at sign-up (the region their store sells in), pushed
  through ``merchant_profile_push``; a viewer with a merchant profile is a merchant (perfusion.user_features).
- ``user_vector``: the feature service of what the user vector u reads (perfusion.user_features.USER_FEATURE_REFS);
  the service's online reads and the trainer's offline reads ask for it by name.

The windowed counts, ``ctr``, ``cvr`` and ``last_active_ts`` are for people and monitoring. A windowed count carries
its window in the field tag ``window_minutes``: the reads in perfusion.feature_store turn it into 0 once the window
has passed since the row's event time (docs/user-vector.md, "Ageing").

Nothing here reads the environment. The offline history files are named relative to the store's repo path (its
folder, given to ``FeatureStore(config=RepoConfig(repo_path=...))`` by perfusion.feature_store), so one registry
names no place, and two stores in two folders can be open in one process.
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float32, Float64, Int64

# Length of a descriptor (perfusion.attributes.DESCRIPTOR_DIM); this repo imports feast only, so a test checks
# that the two agree.
DESCRIPTOR_DIM = 26
OFFLINE_FOLDER = "offline"
"""Where the offline history lives, relative to the store's folder (never inside this repo folder)."""
WINDOW_TAG = "window_minutes"
"""Field tag of a windowed count: the window's length in minutes (perfusion.feature_store reads it)."""
WINDOWS_MINUTES = {"1h": 60, "1d": 1440}
# A view's ttl says how long after its event time a row is valid; 0 means for ever. Every view here holds state
# that stays true until the next push (all-time counters, the preference vector, profiles), so none expires as a
# whole; the windowed counts age one by one through their WINDOW_TAG instead.
NO_EXPIRY = timedelta(0)

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="a shopper or merchant")
design = Entity(name="design", join_keys=["design_id"], value_type=ValueType.STRING, description="a text design")


def _history(view: str) -> FileSource:
    return FileSource(
        name=f"{view}_history", path=f"{OFFLINE_FOLDER}/{view}.parquet", timestamp_field="event_timestamp"
    )


def _count(kind: str, window: str) -> Field:
    if window == "total":
        return Field(name=f"{kind}_total", dtype=Int64, description=f"{kind}, all time")
    return Field(
        name=f"{kind}_{window}",
        dtype=Int64,
        description=f"{kind} in the last {window} of event time; 0 once {window} has passed since the row's event time",
        tags={WINDOW_TAG: str(WINDOWS_MINUTES[window])},
    )


user_preferences_history = _history("user_preferences")
user_preferences_push = PushSource(name="user_preferences_push", batch_source=user_preferences_history)

user_preferences = FeatureView(
    name="user_preferences",
    entities=[user],
    ttl=NO_EXPIRY,
    schema=[
        *(
            _count(kind, window)
            for kind in ("impressions", "clicks", "orders", "returns")
            for window in (*WINDOWS_MINUTES, "total")
        ),
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

user_profile_history = _history("user_profile")
user_profile_push = PushSource(name="user_profile_push", batch_source=user_profile_history)

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=NO_EXPIRY,
    schema=[
        Field(name="age_group", dtype=Int64, description="0..4, youngest to oldest"),
        Field(name="region", dtype=Int64, description="0..3"),
    ],
    source=user_profile_push,
    online=True,
)

merchant_profile_history = _history("merchant_profile")
merchant_profile_push = PushSource(name="merchant_profile_push", batch_source=merchant_profile_history)

merchant_profile = FeatureView(
    name="merchant_profile",
    entities=[user],
    ttl=NO_EXPIRY,
    schema=[
        # Not "region": Feast names features without their view, so two views may not share a name.
        Field(name="store_region", dtype=Int64, description="0..3, the region the merchant's store sells in"),
    ],
    source=merchant_profile_push,
    online=True,
)

user_vector = FeatureService(
    name="user_vector",
    features=[
        user_preferences[
            [
                "clicks_total",
                "orders_total",
                "returns_total",
                "images_shown_total",
                "images_reviewed_total",
                "images_selected_total",
                "preference",
            ]
        ],
        user_profile[["age_group", "region"]],
        merchant_profile[["store_region"]],
    ],
    description="what the user vector u reads (perfusion.user_features.USER_FEATURE_REFS; a test checks they agree)",
    tags={"readers": "service.features, trainer.loop"},
)
