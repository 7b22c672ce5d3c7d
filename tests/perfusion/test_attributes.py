"""Prompts that name some attribute kinds and leave the others open."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perfusion.attributes import ATTRIBUTE_KINDS, OPEN_KINDS, Attributes, named_subsets

NAVY_STRIPED = Attributes(garment="t-shirt", colour="navy", pattern="striped", sleeve="long-sleeve", fit="slim")
RED_PLAIN = Attributes(garment="dress", colour="red", pattern="plain", sleeve="short-sleeve", fit="loose")

attributes = st.builds(Attributes, **{kind: st.sampled_from(values) for kind, values in ATTRIBUTE_KINDS.items()})


def test_a_prompt_names_the_garment_and_the_chosen_kinds_in_caption_order() -> None:
    assert NAVY_STRIPED.prompt(()) == "a t-shirt"
    assert NAVY_STRIPED.prompt(("colour",)) == "a navy t-shirt"
    assert NAVY_STRIPED.prompt(("fit", "pattern")) == "a striped slim t-shirt"
    assert NAVY_STRIPED.prompt() == NAVY_STRIPED.caption() == "a navy striped long-sleeve slim t-shirt"


def test_a_named_plain_pattern_is_written_so_that_no_pattern_word_leaves_it_open() -> None:
    assert RED_PLAIN.caption() == "a red short-sleeve loose dress"
    assert RED_PLAIN.prompt() == "a red plain short-sleeve loose dress"
    assert RED_PLAIN.prompt(("colour", "sleeve", "fit")) == "a red short-sleeve loose dress"


def test_an_unknown_kind_is_refused_with_the_kinds_a_prompt_may_name() -> None:
    with pytest.raises(ValueError, match="colour, pattern, sleeve, fit"):
        NAVY_STRIPED.prompt(("garment",))


def test_named_subsets_enumerate_every_subset_once_by_bits() -> None:
    subsets = named_subsets()
    assert len(subsets) == 16 and len(set(subsets)) == 16
    assert (
        subsets[0] == ()
        and subsets[15] == OPEN_KINDS
        and subsets[1] == ("colour",)
        and subsets[6]
        == (
            "pattern",
            "sleeve",
        )
    )


@given(attributes)
def test_every_prompt_of_an_item_names_only_its_own_labels(attrs: Attributes) -> None:
    prompts = attrs.prompts()
    assert len(prompts) == 16 and len(set(prompts)) == 16  # "plain" keeps a named plain pattern distinct
    for named, prompt in zip(named_subsets(), prompts, strict=True):
        words = prompt.split()
        assert words[0] == "a" and words[-1] == attrs.garment
        assert words[1:-1] == [getattr(attrs, kind) for kind in OPEN_KINDS if kind in named]
