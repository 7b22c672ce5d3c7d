"""The typed client against the real app: designs, candidates, images, events, and refusals as problem details."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from perfusion.text_encoder import TextEncoder
from service.client import PerfusionClient, ServiceProblem
from tests.service.test_service_api import NoFeatures, RecordingSink, build_service, tiny_generator


def test_a_merchant_and_a_shopper_through_the_typed_client(tmp_path: Path, text_encoder: TextEncoder) -> None:
    service = build_service(tmp_path, tiny_generator(text_encoder), RecordingSink(), NoFeatures())
    merchant = PerfusionClient("", service.key("merchant", "m-1").key, http=TestClient(service.app))
    shopper = PerfusionClient("", service.key("shopper", "s-1").key, http=TestClient(service.app))

    design = merchant.create_design("a red striped t-shirt", order_threshold=2)
    assert design.merchant_id == "m-1"
    assert [d.design_id for d in merchant.designs().designs] == [design.design_id]
    group = shopper.candidates(design.design_id, k=2, seed=3)
    assert group.user_id == "s-1" and len(group.candidates) == 2 and group.drawn == 2
    assert shopper.image(group.candidates[0].image_id).startswith(b"\x89PNG")
    click = {
        "kind": "click",
        "event_id": f"evt-{uuid.uuid4().hex}",
        "ts": time.time(),
        "user_id": "s-1",
        "impression_id": group.impression_id,
        "design_id": design.design_id,
        "image_id": group.candidates[0].image_id,
    }
    assert shopper.post_event(click).kind == "click"
    status = merchant.design(design.design_id)
    assert status.net_orders == 0 and not status.production_triggered

    with pytest.raises(ServiceProblem) as refused:
        shopper.create_design("a navy dress", order_threshold=1)
    assert refused.value.status == 403 and refused.value.problem is not None
    assert refused.value.problem.type.endswith("/problems/role-not-allowed")
    with pytest.raises(ServiceProblem) as unknown:
        merchant.design("no-such-design")
    assert unknown.value.status == 404 and unknown.value.problem is not None
    assert unknown.value.problem.field == "design_id"
