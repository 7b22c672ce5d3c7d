"""What each role may do: the one table of actions and roles, and the ownership rules, for every endpoint.

:data:`ALLOWED_ROLES` says which roles may attempt an action at all (403 ``role-not-allowed`` for the others);
then ownership decides (403 ``not-your-resource``): a merchant acts on their own designs only, and a shopper or a
merchant acts for themselves only (a body naming another user or merchant is refused). The order system reports
orders and returns for any shopper; the operator reads everything and previews candidates for any viewer, and
posts no events (events are facts of shoppers, merchants and orders, reported by whoever saw them happen).

The README's table of who may do what is this module, and tests/service/test_auth.py holds every row of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Final, Literal

from service.auth import Principal, Role
from service.designs import Design
from service.ledger import ServedImpression
from service.problems import Refusal

Action = Literal[
    "create_design",
    "list_designs",
    "read_design",
    "request_candidates",
    "read_image",
    "post_click",
    "post_select",
    "post_order",
    "post_return",
]

ALLOWED_ROLES: Final[Mapping[Action, frozenset[Role]]] = {
    "create_design": frozenset({"merchant", "operator"}),
    "list_designs": frozenset({"merchant", "operator"}),
    "read_design": frozenset({"merchant", "operator"}),
    "request_candidates": frozenset({"merchant", "shopper", "operator"}),
    "read_image": frozenset({"merchant", "shopper", "operator"}),
    "post_click": frozenset({"shopper"}),
    "post_select": frozenset({"merchant"}),
    "post_order": frozenset({"order_system"}),
    "post_return": frozenset({"order_system"}),
}

ACTION_TEXT: Final[Mapping[Action, str]] = {
    "create_design": "create designs (POST /designs)",
    "list_designs": "list designs (GET /designs)",
    "read_design": "read designs (GET /designs/{id})",
    "request_candidates": "request candidates (POST /designs/{id}/candidates)",
    "read_image": "read images (GET /images/{id})",
    "post_click": "post clicks (POST /events)",
    "post_select": "post selections (POST /events)",
    "post_order": "post orders (POST /events)",
    "post_return": "post returns (POST /events)",
}

ROLE_TEXT: Final[Mapping[Role, str]] = {
    "merchant": "a merchant",
    "shopper": "a shopper",
    "order_system": "the order system",
    "operator": "an operator",
}

EVENT_ACTIONS: Final[Mapping[str, Action]] = {
    "click": "post_click",
    "select": "post_select",
    "order": "post_order",
    "return": "post_return",
}

# Roles that act as themselves: the user or merchant a request names must be the principal.
_SELF_ACTING: Final[frozenset[Role]] = frozenset({"merchant", "shopper"})


def require(principal: Principal, action: Action) -> None:
    """Refuse with 403 unless ``principal``'s role may ``action``."""
    allowed = ALLOWED_ROLES[action]
    if principal.role not in allowed:
        who = " or ".join(ROLE_TEXT[role] for role in sorted(allowed))
        raise Refusal(
            "role-not-allowed",
            f"Authorization: {principal.describe()} may not {ACTION_TEXT[action]}; only {who} may: send such a "
            "principal's key",
            field="Authorization",
        )


def acting_for(principal: Principal, claimed: str | None, field: str) -> str:
    """The user (or merchant) a request acts for: a merchant or shopper acts for themselves (``claimed`` may be left
    out, and naming anyone else is 403); an operator or the order system must name them (422 when left out)."""
    if principal.role in _SELF_ACTING:
        if claimed is not None and claimed != principal.id:
            raise Refusal(
                "not-your-resource",
                f"{field}: {claimed!r} is not you ({principal.describe()}); leave {field} out or send {principal.id!r}",
                field=field,
            )
        return principal.id
    if claimed is None:
        raise Refusal(
            "invalid-request",
            f"{field}: required when {ROLE_TEXT[principal.role]} calls; name the user the request is for",
            field=field,
        )
    return claimed


def require_own_design(principal: Principal, design: Design, field: str = "design_id") -> None:
    """A merchant may act on their own designs only; an operator on all (the role was checked before)."""
    if principal.role == "merchant" and design.merchant_id != principal.id:
        raise Refusal(
            "not-your-resource",
            f"{field}: design {design.design_id!r} belongs to another merchant, not to {principal.id!r}; act on your "
            "own designs (GET /designs lists them)",
            field=field,
        )


def require_image_access(
    principal: Principal,
    image_id: str,
    served: Sequence[ServedImpression],
    merchant_of: Callable[[str], str | None],
) -> None:
    """An image is for those it was served to, the merchants of the designs it was served for, and operators
    (``merchant_of`` gives a design's merchant)."""
    if principal.role == "operator" or any(impression.user_id == principal.id for impression in served):
        return
    if principal.role == "merchant" and any(merchant_of(i.design_id) == principal.id for i in served):
        return
    raise Refusal(
        "not-your-resource",
        f"image_id: {image_id!r} was served to another user, of a design that is not yours; read the images of "
        "impressions served to you (or of your own designs)",
        field="image_id",
    )
