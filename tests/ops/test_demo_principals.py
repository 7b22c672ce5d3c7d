"""The demo's principals: the keys it creates authenticate as their roles, and a round played against the real app
(in process, tiny models) passes every rule the service enforces: merchants review and select their own designs,
shoppers click what they were served, the order system reports their orders and returns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ops.demo.client import ServiceClient, ServiceRequestFailed
from ops.demo.loop import LoopRun, LoopSettings, refused_without_a_key
from ops.demo.principals import ORDER_SYSTEM, DemoClients, issue_keys
from ops.demo.shoppers import ShopperBehaviour
from perfusion.errors import ConfigError
from perfusion.text_encoder import TextEncoder
from service.auth import KeyStore
from tests.service.test_service_api import NoFeatures, RecordingSink, build_service, tiny_generator

MERCHANTS = ["merchant-0", "merchant-1"]
SHOPPERS = ["user-0", "user-1", "user-2"]


class BrightnessPanel:
    """Shoppers who like bright images (user-0 most), enough to make the demo's shoppers act."""

    def user_ids(self) -> list[str]:
        return list(SHOPPERS)

    def profile(self, user_id: str) -> dict[str, int]:
        return {"age_group": 1, "region": 0}

    def utilities(self, user_id: str, images: np.ndarray) -> np.ndarray:
        brightness = images.reshape(len(images), -1).mean(axis=1) / 255.0
        return (brightness - 0.5) * (3 - SHOPPERS.index(user_id)) + 1.0


def test_the_demo_keys_authenticate_as_their_roles(tmp_path: Path) -> None:
    keys = issue_keys(tmp_path / "keys.json", MERCHANTS, SHOPPERS)
    store = KeyStore(keys.keys_file)
    roles = {key: store.authenticate(key) for key in [*keys.merchants.values(), *keys.shoppers.values()]}
    assert {(p.role, p.id) for p in roles.values() if p is not None} == {
        *(("merchant", m) for m in MERCHANTS),
        *(("shopper", s) for s in SHOPPERS),
    }
    order_system = store.authenticate(keys.order_system)
    assert order_system is not None and (order_system.role, order_system.id) == ("order_system", ORDER_SYSTEM)
    operator = store.authenticate(keys.operator)
    assert operator is not None and operator.role == "operator"
    assert keys.order_system not in keys.keys_file.read_text()
    clients = DemoClients(ServiceClient("http://service"), keys)
    with pytest.raises(ConfigError, match="no key for shopper 'user-9'"):
        clients.shopper("user-9")


def test_a_round_of_the_demo_passes_the_services_rules(tmp_path: Path, text_encoder: TextEncoder) -> None:
    sink = RecordingSink()
    service = build_service(tmp_path, tiny_generator(text_encoder), sink, NoFeatures())
    keys = issue_keys(service.keys.path, MERCHANTS, SHOPPERS)
    pool = TestClient(service.app, base_url="http://service")  # an httpx.Client that calls the app in process
    clients = DemoClients(ServiceClient("http://service", pool=pool), keys)
    assert "401" in refused_without_a_key(clients)

    keen = ShopperBehaviour(click_rate=0.95, order_rate=0.9, return_rate=0.4)
    settings = LoopSettings(prompts=("a red dress", "a navy jacket"), k=2, sampling_steps=2, behaviour=keen, seed=1)
    run = LoopRun(settings, BrightnessPanel(), clients, SHOPPERS, MERCHANTS)
    design_ids = run.create_designs()
    reports = [run.play_round(number) for number in (1, 2, 3)]

    assert [failure for report in reports for failure in report.failed_requests] == []
    sent: dict[str, Any] = {}
    for report in reports:
        for kind, count in report.events_sent.items():
            sent[kind] = sent.get(kind, 0) + count
    assert sent["select"] == 6 and sent["click"] > 0 and sent["order"] > 0, sent
    kinds = [event.kind for event in sink.events]
    assert kinds.count("order") == sent["order"] and kinds.count("return") == sent.get("return", 0)
    # Every merchant's design is theirs, and they read it (and only they, of the merchants).
    for index, design_id in enumerate(design_ids):
        owner, other = MERCHANTS[index], MERCHANTS[1 - index]
        assert clients.merchant(owner).design(design_id).merchant_id == owner
        with pytest.raises(ServiceRequestFailed) as refused:
            clients.merchant(other).design(design_id)
        assert refused.value.status_code == 403
    run.observe(reports[-1], _nothing_observed(), "")
    assert [design.design_id for design in reports[-1].designs] == design_ids


def _nothing_observed() -> Any:
    from ops.demo.observer import ObservedLoop

    return ObservedLoop()
