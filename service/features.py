"""Online read of one user's features from Feast, inside the candidates request path.

:class:`FeastFeatureReader` reads the ``user_vector`` feature service (features/definitions.py) online for one
entity row, through :func:`perfusion.feature_store.online_feature_rows` (values aged as every online read is), and
returns the values by feature name (``None`` where the store holds nothing for the user). Any failure of the store
becomes
:class:`FeatureStoreUnavailable`, which the app answers with 503: a request is never served as if the user were
unknown because the store was down.

:func:`user_condition` turns the values into the generator's condition: the user vector u with its kind of
personalization, or no vector at all for a user Feast knows nothing about (the base model serves them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from perfusion.errors import InfrastructureError
from perfusion.feature_store import USER_VECTOR_SERVICE, FeatureAges, feature_views_of, online_feature_rows
from perfusion.user_features import USER_VECTOR_SLICES, user_vector
from service.schemas import Personalization

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore

logger = logging.getLogger(__name__)

USER_ENTITY_KEY = "user_id"
# Not a valid principal (service.auth.PRINCIPAL_PATTERN starts with a letter or digit), so no user's row.
READINESS_USER = "~readiness-check"


class FeatureStoreUnavailable(InfrastructureError):
    """The online store could not be read; the caller should retry later (HTTP 503)."""


class FeatureReader(Protocol):
    def read(self, user_id: str) -> dict[str, Any]:
        """Feature name -> value (None where missing) for one user, or raise :class:`FeatureStoreUnavailable`."""


class FeastFeatureReader:
    """Reads one user's features from a Feast store's online store: the feature service ``feature_service`` (by
    default the user vector's), or the ``feature_refs`` ("view:feature") given instead."""

    def __init__(
        self,
        store: FeatureStore,
        feature_refs: Sequence[str] | None = None,
        entity_key: str = USER_ENTITY_KEY,
        feature_service: str = USER_VECTOR_SERVICE,
    ) -> None:
        if feature_refs is not None and not feature_refs:
            raise ValueError("feature_refs must name at least one 'view:feature'")
        self.store = store
        self.feature_refs = list(feature_refs) if feature_refs is not None else None
        self.feature_service = feature_service
        self.entity_key = entity_key
        # The service and the ages of its views, looked up in the registry on the first read that finds them.
        self._features: tuple[Sequence[str] | FeatureService, FeatureAges] | None = None

    def _resolved(self) -> tuple[Sequence[str] | FeatureService, FeatureAges]:
        if self._features is None:
            features: Sequence[str] | FeatureService = (
                self.feature_refs
                if self.feature_refs is not None
                else self.store.get_feature_service(self.feature_service)
            )
            self._features = (features, FeatureAges.of(feature_views_of(self.store, features)))
        return self._features

    def read(self, user_id: str) -> dict[str, Any]:
        try:
            features, ages = self._resolved()
            [row] = online_feature_rows(self.store, features, [{self.entity_key: user_id}], ages=ages)
        except Exception as exc:  # Feast raises many unrelated types (sqlite, redis, registry, protobuf)
            raise FeatureStoreUnavailable(
                f"Feast online read of user {user_id!r} failed ({type(exc).__name__}: {exc}); check the store "
                "with `perfusion features apply` and retry"
            ) from exc
        # Feast returns columns by feature name (without the view) unless full_feature_names is asked for.
        return {name: value for name, value in row.items() if name != self.entity_key}

    def check_reachable(self, timeout_s: float) -> str:
        """One online read, of a user id no principal can have, as a candidates request reads; what it answered,
        or :class:`FeatureStoreUnavailable`. ``timeout_s`` is for the caller to wait: a Feast read takes no timeout."""
        values = self.read(READINESS_USER)
        return f"online store read {len(values)} features"


def user_condition(
    features: Mapping[str, Any], now: float | None = None
) -> tuple[Personalization, NDArray[np.float32] | None]:
    """How to condition generation for a user with these feature values.

    - ``personalized``: preference features exist (a shopper's or a merchant's); u from all features.
    - ``cold_start``: only a profile exists (a shopper's user_profile or a merchant's merchant_profile); u from the
      profile (behaviour blocks at their priors).
    - ``base``: nothing is known; no u, and the generator runs the base model without the adaptive network.

    ``now`` is the time the condition is for (default: the clock); u does not depend on it.
    """
    vector = user_vector(features, as_of=time.time() if now is None else now)
    preferences_present, profile_present, merchant_present = vector[USER_VECTOR_SLICES["present"]]
    if preferences_present:
        return "personalized", vector
    if profile_present or merchant_present:
        return "cold_start", vector
    return "base", None
