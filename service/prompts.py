"""What the model can draw: the check of a design's prompt before anything is generated for it.

The base model was trained on captions and prompts over the attribute vocabulary of :mod:`perfusion.attributes`
("a navy striped long-sleeve slim t-shirt", "a red dress"), read by the text encoder at the base model's
``text_max_length`` tokens. Any other word reaches the UNet as token states it never learnt to draw, and tokens past
the limit were cut off without a word. So a prompt is drawable when

- every word (the prompt lowercased and split at whitespace) is a value of an attribute kind (garment, colour,
  pattern, sleeve, fit: :data:`VOCABULARY`) or an article (:data:`FUNCTION_WORDS`); a word with punctuation or
  digits is not a value;
- it names exactly one garment (the vocabulary's kinds a prompt may leave open are the others) and at most one value
  of every other kind: the model draws one colour, one pattern, one sleeve and one fit;
- it is at most the text encoder's ``max_length`` tokens, its CLS and SEP markers included.

A prompt that breaks a rule is refused with 422 ``prompt-not-drawable`` problem details naming the field, the words
the model does not know (with the vocabulary word each may have meant) or the token count and the limit, and the
fix; the refusal also carries them as members ``unknown_words``, ``token_count`` and ``token_limit``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

from perfusion.attributes import ATTRIBUTE_KINDS
from service.problems import Refusal

FUNCTION_WORDS: Final[tuple[str, ...]] = ("a", "an", "the")
KIND_OF_WORD: Final[Mapping[str, str]] = {value: kind for kind, values in ATTRIBUTE_KINDS.items() for value in values}
VOCABULARY: Final[tuple[str, ...]] = tuple(KIND_OF_WORD)
EXAMPLE_PROMPT: Final = "a red striped short-sleeve slim t-shirt"
_PLURAL: Final[Mapping[str, str]] = {"colour": "colours", "fit": "fits", "pattern": "patterns", "sleeve": "sleeves"}


@runtime_checkable
class CountsTokens(Protocol):
    """The text encoder's side of the check (:class:`perfusion.text_encoder.TextEncoder`)."""

    max_length: int

    def token_count(self, prompt: str) -> int: ...


@dataclass(frozen=True)
class PromptVerdict:
    """What is wrong with one prompt; ``drawable`` when nothing is."""

    prompt: str
    token_count: int
    token_limit: int
    unknown_words: tuple[str, ...] = ()
    garments: tuple[str, ...] = ()
    repeated_kinds: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def drawable(self) -> bool:
        return (
            not self.unknown_words
            and len(self.garments) == 1
            and not self.repeated_kinds
            and self.token_count <= self.token_limit
        )

    def reasons(self) -> list[str]:
        """One sentence per broken rule, each with its fix."""
        reasons = []
        if self.unknown_words:
            words = ", ".join(repr(word) for word in self.unknown_words)
            meant = [f"{guess!r} for {word!r}" for word in self.unknown_words if (guess := closest_word(word))]
            hint = f" (did you mean {', '.join(meant)}?)" if meant else ""
            reasons.append(
                f"the model does not know the words {words}{hint}; it draws a garment and its colour, pattern, "
                "sleeve and fit, so use only those words and an article"
            )
        if not self.garments:
            reasons.append(f"it names no garment; name one of {', '.join(ATTRIBUTE_KINDS['garment'])}")
        elif len(self.garments) > 1:
            reasons.append(f"it names {len(self.garments)} garments ({', '.join(self.garments)}); keep one")
        for kind, values in self.repeated_kinds.items():
            reasons.append(
                f"it names {len(values)} {_PLURAL[kind]} ({', '.join(values)}); the model draws one: keep one"
            )
        if self.token_count > self.token_limit:
            reasons.append(
                f"it is {self.token_count} tokens (CLS and SEP included) and the text encoder reads "
                f"{self.token_limit}, so the rest would be cut off; shorten it"
            )
        return reasons

    def extensions(self) -> dict[str, Any]:
        """The problem details' members of this verdict."""
        return {
            "unknown_words": list(self.unknown_words),
            "token_count": self.token_count,
            "token_limit": self.token_limit,
        }


def closest_word(word: str) -> str | None:
    """The vocabulary word ``word`` most likely meant ("gray" -> "grey", "short" -> "short-sleeve"), else None."""
    close = difflib.get_close_matches(word, VOCABULARY, n=1, cutoff=0.75)
    if close:
        return close[0]
    starting = [value for value in VOCABULARY if len(word) >= 3 and value.startswith(word)]
    return starting[0] if len(starting) == 1 else None


class PromptNotDrawable(Refusal):
    """422 ``prompt-not-drawable``, with the verdict's members in the problem details."""

    def __init__(self, detail: str, field_name: str, verdict: PromptVerdict) -> None:
        super().__init__("prompt-not-drawable", detail, field=field_name)
        self.verdict = verdict


class PromptCheck:
    """Checks prompts against the vocabulary and the token limit of ``encoder``."""

    def __init__(self, encoder: CountsTokens) -> None:
        self.encoder = encoder

    @property
    def token_limit(self) -> int:
        return int(self.encoder.max_length)

    def verdict(self, prompt: str) -> PromptVerdict:
        words = prompt.lower().split()
        unknown = tuple(
            dict.fromkeys(word for word in words if word not in KIND_OF_WORD and word not in FUNCTION_WORDS)
        )
        named: dict[str, list[str]] = {}
        for word in words:
            if word in KIND_OF_WORD:
                values = named.setdefault(KIND_OF_WORD[word], [])
                if word not in values:
                    values.append(word)
        repeated = {kind: tuple(values) for kind, values in named.items() if kind != "garment" and len(values) > 1}
        return PromptVerdict(
            prompt=prompt,
            token_count=self.encoder.token_count(prompt),
            token_limit=self.token_limit,
            unknown_words=unknown,
            garments=tuple(named.get("garment", ())),
            repeated_kinds=repeated,
        )

    def require_drawable(self, prompt: str) -> None:
        """Refuse a new design's ``prompt`` that the model cannot draw (field ``prompt``)."""
        verdict = self.verdict(prompt)
        if not verdict.drawable:
            raise PromptNotDrawable(
                f"prompt: {prompt!r} cannot be drawn: {'; '.join(verdict.reasons())} (e.g. {EXAMPLE_PROMPT!r})",
                "prompt",
                verdict,
            )

    def require_design_drawable(self, design_id: str, prompt: str) -> None:
        """Refuse to generate for a stored design whose prompt the model cannot draw (field ``design_id``): one made
        before prompts were checked, or for a model with a shorter token limit."""
        verdict = self.verdict(prompt)
        if not verdict.drawable:
            raise PromptNotDrawable(
                f"design_id: the prompt {prompt!r} of design {design_id!r} cannot be drawn: "
                f"{'; '.join(verdict.reasons())}; create a design with a prompt the model can draw (POST /designs)",
                "design_id",
                verdict,
            )


def refused_prompts(check: PromptCheck, prompts: Sequence[str]) -> dict[str, list[str]]:
    """The reasons of every prompt of ``prompts`` that ``check`` refuses (empty: all drawable)."""
    return {prompt: verdict.reasons() for prompt in prompts if not (verdict := check.verdict(prompt)).drawable}
