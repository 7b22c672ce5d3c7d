"""Prompts are checked against what the model can draw before anything is generated: the attribute vocabulary (one
garment, at most one value of each other kind, articles) and the text encoder's token limit; refusals are 422
``prompt-not-drawable`` naming the field, the unknown words or the token count and the limit, and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from ops.demo.loop import DEFAULT_PROMPTS
from perfusion.attributes import ATTRIBUTE_KINDS, Attributes
from perfusion.text_encoder import TextEncoder
from service.prompts import FUNCTION_WORDS, VOCABULARY, PromptCheck, closest_word, refused_prompts
from simulator.eval.plan import HELDOUT_PROMPTS, TRAIN_PROMPTS
from tests.browser.test_studio_and_storefront import PROMPT as BROWSER_PROMPT
from tests.service.test_service_api import (
    NoFeatures,
    RecordingSink,
    ServiceUnderTest,
    build_service,
    create_design,
    tiny_generator,
)


@pytest.fixture(scope="module")
def check(text_encoder: TextEncoder) -> PromptCheck:
    return PromptCheck(text_encoder)


def test_the_loops_own_prompts_are_drawable(check: PromptCheck) -> None:
    catalog = Attributes(garment="t-shirt", colour="navy", pattern="striped", sleeve="long-sleeve", fit="slim")
    prompts = [
        *DEFAULT_PROMPTS,
        *TRAIN_PROMPTS,
        *HELDOUT_PROMPTS,
        BROWSER_PROMPT,
        catalog.caption(),
        *catalog.prompts(),
        "A Red Dress",  # the text encoder is uncased
        "an orange hoodie",
        "the grey checked skirt",
    ]
    assert refused_prompts(check, prompts) == {}


def test_the_longest_vocabulary_prompt_fits_the_base_models_tokens(check: PromptCheck) -> None:
    longest = {kind: max(values, key=len) for kind, values in ATTRIBUTE_KINDS.items()}
    verdict = check.verdict(Attributes(**longest).prompt())
    assert verdict.drawable and verdict.token_count <= check.token_limit == 16


@pytest.mark.parametrize(
    ("prompt", "unknown", "reason"),
    [
        ("a navy coat", ["coat"], "names no garment"),
        ("a summer dress with pockets", ["summer", "with", "pockets"], "does not know the words 'summer', 'with'"),
        ("a gray dress", ["gray"], "did you mean 'grey' for 'gray'?"),
        ("a red dress.", ["dress."], "did you mean 'dress' for 'dress.'?"),
        ("a dress 2", ["2"], "does not know the words '2'"),
        ("a red", [], "names no garment; name one of t-shirt, dress"),
        ("a red blue dress", [], "names 2 colours (red, blue); the model draws one"),
        ("a dress a skirt", [], "names 2 garments (dress, skirt); keep one"),
    ],
)
def test_prompts_the_model_cannot_draw_say_why(
    check: PromptCheck, prompt: str, unknown: list[str], reason: str
) -> None:
    verdict = check.verdict(prompt)
    assert not verdict.drawable
    assert list(verdict.unknown_words) == unknown
    assert any(reason in sentence for sentence in verdict.reasons()), verdict.reasons()


def test_closest_words_suggest_what_was_meant() -> None:
    assert closest_word("tshirt") == "t-shirt"
    assert closest_word("short") == "short-sleeve"
    assert closest_word("coat") is None
    assert set(FUNCTION_WORDS).isdisjoint(VOCABULARY)


# ------------------------------------------------------------------------------------------------------ the app


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def service(tmp_path: Path, text_encoder: TextEncoder, sink: RecordingSink) -> ServiceUnderTest:
    return build_service(tmp_path, tiny_generator(text_encoder), sink, NoFeatures())


def not_drawable(response: httpx.Response, field: str) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["type"] == "/problems/prompt-not-drawable"
    assert problem["field"] == field and problem["detail"].startswith(f"{field}: ")
    return problem


def test_a_design_with_unknown_words_is_422_and_not_kept(
    service: ServiceUnderTest, sink: RecordingSink, text_encoder: TextEncoder
) -> None:
    response = service.merchant().post("/designs", json={"prompt": "a green scarf", "order_threshold": 2})
    problem = not_drawable(response, "prompt")
    assert problem["unknown_words"] == ["scarf"]
    assert "'scarf'" in problem["detail"] and "e.g. 'a red striped short-sleeve slim t-shirt'" in problem["detail"]
    assert (problem["token_count"], problem["token_limit"]) == (text_encoder.token_count("a green scarf"), 16)
    assert sink.events == [] and service.designs.designs_of() == []


def test_a_prompt_over_the_token_limit_is_422_with_the_count_and_the_limit(
    tmp_path: Path, text_encoder: TextEncoder, sink: RecordingSink
) -> None:
    short_reader = TextEncoder(max_length=8)  # a model trained at 8 tokens
    service = build_service(
        tmp_path, tiny_generator(text_encoder), sink, NoFeatures(), prompt_check=PromptCheck(short_reader)
    )
    prompt = "a red striped short-sleeve slim t-shirt"  # 12 tokens
    problem = not_drawable(service.merchant().post("/designs", json={"prompt": prompt, "order_threshold": 2}), "prompt")
    assert (problem["token_count"], problem["token_limit"], problem["unknown_words"]) == (12, 8, [])
    assert "12 tokens" in problem["detail"] and "reads 8" in problem["detail"] and "shorten it" in problem["detail"]
    assert sink.events == []
    assert service.merchant().post("/designs", json={"prompt": "a red dress", "order_threshold": 2}).status_code == 201


def test_generation_from_a_stored_design_the_model_cannot_draw_is_422(
    service: ServiceUnderTest, sink: RecordingSink
) -> None:
    stored = service.designs.create("m-1", "a navy coat", order_threshold=2)  # made before prompts were checked
    response = service.merchant("m-1").post(f"/designs/{stored.design_id}/candidates", json={"k": 1})
    problem = not_drawable(response, "design_id")
    assert problem["unknown_words"] == ["coat"] and "POST /designs" in problem["detail"]
    assert sink.events == []


def test_who_may_create_a_design_is_checked_before_its_prompt(service: ServiceUnderTest) -> None:
    response = service.shopper().post("/designs", json={"prompt": "a navy coat", "order_threshold": 2})
    assert response.status_code == 403 and response.json()["type"] == "/problems/role-not-allowed"
    design = create_design(service.merchant(), prompt="a navy jacket")
    assert service.merchant().post(f"/designs/{design}/candidates", json={"k": 1}).status_code == 200
