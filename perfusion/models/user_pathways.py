"""The names of the ways the user vector u can enter the generator (light: settings import it without torch).

See :mod:`perfusion.models.adaptive` for what each form is.
"""

from __future__ import annotations

from typing import Literal, get_args

UserPathway = Literal["copy_tokens", "base_tokens", "condition_map"]
USER_PATHWAYS: tuple[str, ...] = get_args(UserPathway)
# The form a saved config without ``user_pathway`` was trained in: the only form before the field existed.
LEGACY_USER_PATHWAY: UserPathway = "condition_map"
