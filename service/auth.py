"""Who is calling: API keys of four roles, stored hashed, and the FastAPI dependency that authenticates a request.

Principals and roles (:data:`ROLES`):

- ``merchant``: the principal is the merchant id; creates, lists, reads and reviews their own designs;
- ``shopper``: the principal is the shopper's user id; is served candidates and clicks them;
- ``order_system``: the shop's order system, a trusted service that reports orders and returns of any shopper;
- ``operator``: runs the service; reads every design and image and previews candidates for any viewer.

What each role may do is :mod:`service.access`; this module only says who the caller is.

A key is ``pfk_<key id>_<secret>``: the key id (12 hex digits) finds the stored key, the secret is 256 random bits
(:func:`secrets.token_urlsafe`). The store keeps only the SHA-256 of the whole key, compared with
:func:`hmac.compare_digest`; the key itself is printed once, by ``perfusion keys create``, and never again. Keys live
in one JSON file, ``keys.json`` beside the service's store (``ServiceSettings.store_url``; by default
``<state>/service/keys.json``) unless ``AuthSettings.keys_file`` names another, written atomically (a temporary file
renamed over it) under an exclusive lock, readable by its owner only. The service checks the file at every request
and reads it again whenever it changed, so a key created or revoked with ``perfusion keys --keys-file`` counts from
the next request, without a restart, in every replica of the service that reads the same file.

A request without a bearer key, or with a key that is unknown, malformed or revoked, is answered 401 with
``WWW-Authenticate: Bearer`` (:class:`~service.problems.Refusal`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal, get_args

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import SettingsConfigDict

from perfusion.contracts.records import MAX_CLOCK_SKEW_S
from perfusion.errors import ConfigError
from perfusion.paths import state_dir
from perfusion.settings import Settings
from service.problems import Refusal

Role = Literal["merchant", "shopper", "order_system", "operator"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
KEY_PREFIX: Final = "pfk"
PRINCIPAL_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
_KEY_ID_HEX_DIGITS: Final = 12
_REALM: Final = 'Bearer realm="perfusion"'
# Compared against when a key names no stored key, so that an unknown key id costs what a known one does.
_NO_SUCH_HASH: Final = hashlib.sha256(b"no such key").hexdigest()


class AuthSettings(Settings):
    """Who may call the service and how far its clients' events are trusted (``PERFUSION_SERVE_AUTH__<FIELD>``)."""

    model_config = SettingsConfigDict(env_prefix="PERFUSION_SERVE_AUTH__")

    keys_file: Path | None = Field(
        default=None,
        description="the API key store; None = keys.json beside the service's store (<state>/service/keys.json by "
        "default)",
    )
    max_clock_skew_s: float = Field(
        default=MAX_CLOCK_SKEW_S,
        ge=1.0,
        le=3600.0,
        description="posted events stamped further than this from the service's clock (either way) are refused",
    )
    max_quantity: int = Field(
        default=100, ge=1, le=1000, description="most units one order may be of (returns: at most the order's)"
    )

    def resolved_keys_file(self, beside: Path | None = None) -> Path:
        """``keys_file``, else ``keys.json`` in the folder ``beside`` (the service's store's), else in
        ``<state>/service``."""
        if self.keys_file is not None:
            return self.keys_file
        return (beside if beside is not None else state_dir() / "service") / "keys.json"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: their role, their id (merchant id, user id, system or operator name), their key."""

    role: Role
    id: str
    key_id: str

    def describe(self) -> str:
        return f"{self.role.replace('_', ' ')} {self.id!r}"


class StoredKey(BaseModel):
    """One key as the store keeps it: never the key itself, only its SHA-256."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    key_id: str = Field(pattern=rf"^[0-9a-f]{{{_KEY_ID_HEX_DIGITS}}}$")
    role: Role
    principal: Annotated[str, Field(pattern=PRINCIPAL_PATTERN)]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_ts: float
    revoked_ts: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_ts is None


class KeyFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    schema_version: Literal[1] = 1
    keys: list[StoredKey] = Field(default_factory=list)


@dataclass(frozen=True)
class IssuedKey:
    """A key just created: ``key`` is shown once and is not kept anywhere."""

    stored: StoredKey
    key: str

    @property
    def authorization(self) -> dict[str, str]:
        """The request header that authenticates with this key."""
        return {"Authorization": f"Bearer {self.key}"}


class KeyStoreError(ConfigError):
    """The key store file cannot be read or written, or names no such key."""


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def _key_id_of(key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[2]:
        return None
    key_id = parts[1]
    if len(key_id) != _KEY_ID_HEX_DIGITS or any(c not in "0123456789abcdef" for c in key_id):
        return None
    return key_id


class KeyStore:
    """The API keys of one service, in one JSON file; safe to share between request threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._keys: dict[str, StoredKey] = {}

    @classmethod
    def default(cls, settings: AuthSettings | None = None) -> KeyStore:
        return cls((settings or AuthSettings.from_env()).resolved_keys_file())

    # ------------------------------------------------------------------------------------------- managing keys

    def create(self, role: str, principal: str) -> IssuedKey:
        """A new key for ``principal`` in ``role``; the returned key is the only copy of it."""
        if role not in ROLES:
            raise KeyStoreError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        key_id = secrets.token_hex(_KEY_ID_HEX_DIGITS // 2)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        try:
            stored = StoredKey(
                key_id=key_id, role=role, principal=principal, sha256=_digest(key), created_ts=time.time()
            )
        except ValidationError:
            raise KeyStoreError(
                f"principal must be 1 to 128 letters, digits or . _ : @ - (starting with a letter or digit), "
                f"got {principal!r}"
            ) from None
        with self._locked_file() as keys:
            keys.append(stored)
        return IssuedKey(stored, key)

    def revoke(self, key_id: str) -> StoredKey:
        """Revoke one key (it stays listed, marked revoked); revoking a revoked key changes nothing."""
        with self._locked_file() as keys:
            for index, stored in enumerate(keys):
                if stored.key_id == key_id:
                    if stored.active:
                        keys[index] = stored.model_copy(update={"revoked_ts": time.time()})
                    return keys[index]
        raise KeyStoreError(f"no key {key_id!r} in {self.path}; `perfusion keys list` shows the key ids")

    def all_keys(self) -> list[StoredKey]:
        """Every key, oldest first, revoked ones included."""
        return self._read_file()

    # --------------------------------------------------------------------------------------------- authenticating

    def authenticate(self, key: str) -> Principal | None:
        """The principal of an active key, else None (unknown, malformed or revoked)."""
        stored = self.lookup(key)
        if stored is None or not stored.active:
            return None
        return Principal(role=stored.role, id=stored.principal, key_id=stored.key_id)

    def lookup(self, key: str) -> StoredKey | None:
        """The stored key whose hash is this key's, active or revoked; None when there is none."""
        key_id = _key_id_of(key)
        stored = self._current().get(key_id) if key_id is not None else None
        expected = stored.sha256 if stored is not None else _NO_SUCH_HASH
        matches = hmac.compare_digest(expected, _digest(key))
        return stored if stored is not None and matches else None

    def _current(self) -> dict[str, StoredKey]:
        """The keys as the file holds them now, read again only when the file changed."""
        try:
            info = os.stat(self.path)
            signature: tuple[int, int, int] | None = (info.st_ino, info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            signature = None
        with self._lock:
            if signature is None or signature != self._signature:
                keys = self._read_file() if signature is not None else []
                self._keys = {stored.key_id: stored for stored in keys}
                self._signature = signature
            return self._keys

    # ------------------------------------------------------------------------------------------------ the file

    def _read_file(self) -> list[StoredKey]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise KeyStoreError(f"cannot read the key store {self.path}: {exc}") from exc
        try:
            return list(KeyFile.model_validate_json(raw).keys)
        except ValidationError as exc:
            raise KeyStoreError(
                f"the key store {self.path} is not a key file ({exc.error_count()} errors, first: "
                f"{exc.errors()[0]['msg']}); restore it from a backup or move it away and create new keys"
            ) from None

    @contextlib.contextmanager
    def _locked_file(self) -> Iterator[list[StoredKey]]:
        """The keys for a read-modify-write, under an exclusive lock; written back atomically when the block ends."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                keys = self._read_file()
                yield keys
                self._write_file(keys)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_file(self, keys: list[StoredKey]) -> None:
        text = json.dumps(KeyFile(keys=keys).model_dump(mode="json"), indent=2) + "\n"
        descriptor, temporary = tempfile.mkstemp(prefix=".keys-", dir=self.path.parent)
        try:
            with os.fdopen(descriptor, "w") as handle:
                os.fchmod(handle.fileno(), 0o600)
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise


# ------------------------------------------------------------------------------------------ the FastAPI dependency

_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `perfusion keys create --role ROLE --principal ID`, as `Authorization: Bearer <key>`.",
)


def authenticated(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
) -> Principal:
    """The caller of a request, by the key store of its app (``app.state.keys``), or a 401 refusal."""
    keys: KeyStore = request.app.state.keys
    if credentials is None:
        raise Refusal(
            "missing-credentials",
            "Authorization: no bearer key; send `Authorization: Bearer <key>` with a key from "
            "`perfusion keys create --role ROLE --principal ID`",
            field="Authorization",
            headers={"WWW-Authenticate": _REALM},
        )
    stored = keys.lookup(credentials.credentials)
    if stored is None or not stored.active:
        reason = (
            f"the key {stored.key_id} was revoked"
            if stored is not None
            else "not a key of this service (unknown or malformed)"
        )
        raise Refusal(
            "invalid-key",
            f"Authorization: {reason}; ask an operator for a new key (`perfusion keys create`)",
            field="Authorization",
            headers={"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
        )
    return Principal(role=stored.role, id=stored.principal, key_id=stored.key_id)


Caller = Annotated[Principal, Depends(authenticated)]
"""An endpoint's parameter of this type is its authenticated caller."""
