"""The demo's principals and their API keys: each merchant, each shopper, the shop's order system and an operator.

:func:`issue_keys` creates a key for each in the run's key store before the service starts (the service reads the
same file, ``<run>/service/keys.json``, stored hashed as ``perfusion keys create`` stores them), and
:class:`DemoClients` gives each principal a :class:`~ops.demo.client.ServiceClient` with its key, all on one
connection pool: merchants create, review and select their own designs, shoppers ask for groups and click, and the
order system reports the shoppers' orders and returns, as in a shop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from perfusion.errors import ConfigError

if TYPE_CHECKING:
    from ops.demo.client import ServiceClient

ORDER_SYSTEM = "demo-shop-orders"
OPERATOR = "demo-operator"


@dataclass(frozen=True)
class DemoKeys:
    """The keys of one run (each shown to nobody but the demo's own clients)."""

    keys_file: Path
    merchants: Mapping[str, str]  # merchant id -> key
    shoppers: Mapping[str, str]  # user id -> key
    order_system: str
    operator: str


def issue_keys(keys_file: Path, merchants: Sequence[str], shoppers: Sequence[str]) -> DemoKeys:
    """A new key for every merchant, every shopper, the order system and an operator, in ``keys_file``."""
    from service.auth import KeyStore

    store = KeyStore(keys_file)
    return DemoKeys(
        keys_file=keys_file,
        merchants={merchant: store.create("merchant", merchant).key for merchant in merchants},
        shoppers={shopper: store.create("shopper", shopper).key for shopper in shoppers},
        order_system=store.create("order_system", ORDER_SYSTEM).key,
        operator=store.create("operator", OPERATOR).key,
    )


class DemoClients:
    """Each principal's client, on the connection pool of ``client`` (which sends no key itself)."""

    def __init__(self, client: ServiceClient, keys: DemoKeys) -> None:
        self.anonymous = client
        self.keys = keys
        self.order_system = client.with_key(keys.order_system)
        self.operator = client.with_key(keys.operator)
        self._merchants = {merchant: client.with_key(key) for merchant, key in keys.merchants.items()}
        self._shoppers = {shopper: client.with_key(key) for shopper, key in keys.shoppers.items()}

    def merchant(self, merchant_id: str) -> ServiceClient:
        return _known(self._merchants, merchant_id, "merchant")

    def shopper(self, user_id: str) -> ServiceClient:
        return _known(self._shoppers, user_id, "shopper")


def _known(clients: Mapping[str, ServiceClient], principal: str, role: str) -> ServiceClient:
    if principal not in clients:
        raise ConfigError(f"the demo has no key for {role} {principal!r}; known: {sorted(clients)}")
    return clients[principal]
