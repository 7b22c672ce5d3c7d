"""``perfusion keys create|list|revoke``: the generator service's API keys.

Keys are stored hashed in ``<state>/service/keys.json`` (``PERFUSION_SERVE_AUTH__KEYS_FILE`` or ``--keys-file``
elsewhere); a running service reads the file again when it changes, so a new or revoked key counts from the next
request. ``create`` prints the key once: it is kept nowhere, and a lost key is revoked and replaced.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any

ROLE_CHOICES = ("merchant", "shopper", "order_system", "operator")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "keys",
        help="create, list or revoke the generator service's API keys",
        description="API keys of the generator service's principals: merchants (their merchant id), shoppers (their "
        "user id), the shop's order system (reports orders and returns) and operators. Each request sends one as "
        "`Authorization: Bearer <key>`.",
    )
    parser.add_argument(
        "--keys-file",
        type=Path,
        default=None,
        help="the key store (default: PERFUSION_SERVE_AUTH__KEYS_FILE, else <state>/service/keys.json)",
    )
    actions = parser.add_subparsers(dest="keys_action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="a new key for a principal; printed once, stored hashed")
    create.add_argument("--role", required=True, choices=ROLE_CHOICES, help="what the principal may do")
    create.add_argument(
        "--principal", required=True, help="merchant id, shopper user id, or a name for the order system or operator"
    )
    create.add_argument("--quiet", action="store_true", help="print only the key (for scripts)")
    actions.add_parser("list", help="every key: id, role, principal, created, and whether it was revoked")
    revoke = actions.add_parser("revoke", help="revoke a key; requests with it are answered 401 from then on")
    revoke.add_argument("key_id", help="a key id, as `perfusion keys list` shows it")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from service.auth import AuthSettings, KeyStore

    settings = AuthSettings.from_env(keys_file=args.keys_file)
    store = KeyStore(settings.resolved_keys_file())
    if args.keys_action == "create":
        issued = store.create(args.role, args.principal)
        if args.quiet:
            print(issued.key)
            return 0
        print(f"key id     {issued.stored.key_id}")
        print(f"role       {issued.stored.role}")
        print(f"principal  {issued.stored.principal}")
        print(f"key        {issued.key}")
        print(f"this key is shown once and stored only as its SHA-256 in {store.path}; send it as")
        print("`Authorization: Bearer <key>`")
        return 0
    if args.keys_action == "revoke":
        revoked = store.revoke(args.key_id)
        print(f"revoked {revoked.key_id} ({revoked.role} {revoked.principal}) at {_when(revoked.revoked_ts)}")
        return 0
    keys = store.all_keys()
    if not keys:
        print(f"no keys in {store.path}; create one with `perfusion keys create --role ROLE --principal ID`")
        return 0
    print(f"{'key id':<14}{'role':<14}{'principal':<28}{'created':<22}status")
    for stored in keys:
        status = "active" if stored.active else f"revoked {_when(stored.revoked_ts)}"
        print(f"{stored.key_id:<14}{stored.role:<14}{stored.principal:<28}{_when(stored.created_ts):<22}{status}")
    return 0


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return f"{datetime.datetime.fromtimestamp(ts, tz=datetime.UTC):%Y-%m-%d %H:%M:%S}Z"
