"""Ed25519 application signatures with key roles.

A fleet has three kinds of signing key: the publisher's (manifests, rollout
plans), the operator's (approvals) and each node's. A key carries its role,
and `TrustedKeys` checks the role before the signature, so a node key can never
stand in for the publisher or the operator, even if someone registers it by
mistake under a second role (that is refused too).

Everything here is pure except the explicit `load_*`/`save_*` helpers.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from mesh.durable import write_file_atomic

KEY_ID_HEX_CHARS = 16
RAW_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class IdentityError(Exception):
    """Root of every error raised by `mesh.identity`.

    It lives here because `signing` is the module the rest of the package
    builds on; callers (the CLI) can catch it to report any identity problem.
    """


class SignatureError(IdentityError):
    """A signature was refused: wrong bytes, wrong key, or a key of the wrong role."""


class UnknownKeyError(SignatureError):
    """The signing key is not trusted for any role."""


class KeyRoleError(SignatureError):
    """A key was offered for a role it does not hold."""


class KeyFileError(IdentityError):
    """A key file is missing or does not hold the expected Ed25519 key."""


class KeyRole(enum.Enum):
    """What a signing key is allowed to sign."""

    PUBLISHER = "publisher"  # model manifests and rollout plans
    OPERATOR = "operator"  # approvals of held decisions
    NODE = "node"  # a device's own statements; never a manifest, plan or approval


def key_id(raw_public_key: bytes) -> str:
    """Short stable name of a public key: first 16 hex chars of sha256(raw key)."""
    return hashlib.sha256(raw_public_key).hexdigest()[:KEY_ID_HEX_CHARS]


@dataclass(frozen=True)
class VerifyKey:
    """An Ed25519 public key and the role it is trusted for."""

    raw: bytes
    role: KeyRole

    def __post_init__(self) -> None:
        if len(self.raw) != RAW_KEY_BYTES:
            raise KeyFileError(f"an Ed25519 public key is {RAW_KEY_BYTES} bytes, got {len(self.raw)}")

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    def verify(self, data: bytes, signature: bytes) -> None:
        """Return if `signature` is this key's signature of `data`, else raise SignatureError."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            raise SignatureError(
                f"signature does not match the data for {self.role.value} key {self.key_id}: "
                "the data was changed after signing or was signed by another key"
            ) from None

    def to_pem(self) -> bytes:
        return Ed25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def from_pem(cls, pem: bytes, role: KeyRole) -> VerifyKey:
        try:
            public = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise KeyFileError(f"not a PEM public key: {exc}") from None
        if not isinstance(public, Ed25519PublicKey):
            raise KeyFileError(f"expected an Ed25519 public key, got {type(public).__name__}")
        return cls(public.public_bytes_raw(), role)


class SigningKey:
    """An Ed25519 private key and the role its signatures are made for."""

    def __init__(self, private: Ed25519PrivateKey, role: KeyRole) -> None:
        self._private = private
        self.role = role
        self.verify_key = VerifyKey(private.public_key().public_bytes_raw(), role)

    def __repr__(self) -> str:
        # Never print key material.
        return f"SigningKey(role={self.role.value}, key_id={self.key_id})"

    @classmethod
    def generate(cls, role: KeyRole) -> SigningKey:
        return cls(Ed25519PrivateKey.generate(), role)

    @property
    def key_id(self) -> str:
        return self.verify_key.key_id

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def to_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, pem: bytes, role: KeyRole) -> SigningKey:
        try:
            private = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"not an unencrypted PEM private key: {exc}") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyFileError(f"expected an Ed25519 private key, got {type(private).__name__}")
        return cls(private, role)


class TrustedKeys:
    """The public keys a verifier trusts, each for exactly one role."""

    def __init__(self, keys: Iterable[VerifyKey] = ()) -> None:
        self._by_id: dict[str, VerifyKey] = {}
        for key in keys:
            self.add(key)

    def add(self, key: VerifyKey) -> None:
        """Trust `key` for its role; refuse a key already trusted for another role."""
        known = self._by_id.get(key.key_id)
        if known is None:
            self._by_id[key.key_id] = key
        elif known.raw != key.raw:
            raise KeyRoleError(
                f"key id {key.key_id} already names a different key; refusing an ambiguous key set"
            )
        elif known.role is not key.role:
            raise KeyRoleError(
                f"key {key.key_id} is already trusted as a {known.role.value} key; "
                f"one key cannot also be a {key.role.value} key (generate a separate key)"
            )

    def keys(self, role: KeyRole) -> frozenset[VerifyKey]:
        return frozenset(k for k in self._by_id.values() if k.role is role)

    def __iter__(self) -> Iterator[VerifyKey]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def verify(self, role: KeyRole, data: bytes, signature: bytes, key_id: str) -> VerifyKey:
        """Check that key `key_id` holds `role` and signed `data`; return that key.

        Raises UnknownKeyError, KeyRoleError or SignatureError, each naming the key.
        """
        key = self._by_id.get(key_id)
        if key is None:
            raise UnknownKeyError(
                f"signed by key {key_id}, which is not a trusted key of this fleet; "
                f"only {role.value} keys may sign this"
            )
        if key.role is not role:
            raise KeyRoleError(
                f"signed by key {key_id}, which is a {key.role.value} key; "
                f"only {role.value} keys may sign this"
            )
        key.verify(data, signature)
        return key


def canonical_json(obj: object) -> bytes:
    """Deterministic bytes of a JSON document, for signing: sorted keys, no spaces, UTF-8.

    Object keys must be strings (json would silently turn 1 into "1", letting two
    different documents share one signature); NaN and infinities are refused.
    """
    _check_keys(obj)
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def _check_keys(obj: object) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"canonical JSON needs string keys, got {k!r}")
            _check_keys(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_keys(v)


def load_signing_key(path: Path, role: KeyRole) -> SigningKey:
    """The signing key in `path`; KeyFileError naming the file if it holds none (a TLS key.pem, say)."""
    pem = _read(path, "private key")
    try:
        return SigningKey.from_pem(pem, role)
    except KeyFileError as exc:
        raise KeyFileError(f"{path} is not a {role.value} signing key: {exc}") from None


def load_verify_key(path: Path, role: KeyRole) -> VerifyKey:
    """The public key in `path`; KeyFileError naming the file if it holds none."""
    pem = _read(path, "public key")
    try:
        return VerifyKey.from_pem(pem, role)
    except KeyFileError as exc:
        raise KeyFileError(f"{path} is not a {role.value} public key: {exc}") from None


def save_signing_key(key: SigningKey, path: Path) -> None:
    """Write the private key as PEM, readable by its owner only (0600)."""
    write_file_atomic(path, key.to_pem(), 0o600)


def save_verify_key(key: VerifyKey, path: Path) -> None:
    write_file_atomic(path, key.to_pem(), 0o644)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None
