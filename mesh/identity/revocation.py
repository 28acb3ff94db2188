"""Operator-signed revocations of node certificates, and the set every node enforces.

A device is physically exposed: when one is captured, an operator revokes it. A
`Revocation` names the node id (and optionally one certificate serial) and is signed with
the fleet's operator key; no other key can revoke (a node key cannot cut its peers off).
It revokes every certificate of that node id issued before `revoked_at` (or exactly the
named serial), so a replacement device enrolled afterwards under the same name is trusted.

Rules of this module:

- Pure: documents in, verdicts out; no files, no clock (callers pass `now`).
- `RevocationSet` only grows (a grow-only set, merged by union), so any two nodes that
  have exchanged their sets agree, whatever the order revocations reached them; its
  `digest` lets two nodes see cheaply whether they differ.
- Every document is verified before it joins a set; a set read from disk or from a peer is
  verified entry by entry, and a bad entry is refused by name, never half-trusted.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from mesh.identity.signing import (
    SIGNATURE_BYTES,
    KeyRole,
    SignatureError,
    SigningKey,
    TrustedKeys,
    canonical_json,
)

FORMAT = 1
KIND = "fleetmesh.revocation"
MAX_REASON_CHARS = 512
MAX_REVOCATIONS = 100_000
MAX_DOCUMENT_BYTES = 2048
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class RevocationError(ValueError):
    """A revocation document that is malformed or not signed by a fleet operator key."""


@dataclass(frozen=True)
class Revocation:
    """Certificates of `node_id` (all issued before `revoked_at`, or only `serial`) are revoked."""

    node_id: str
    reason: str
    revoked_at: float
    key_id: str
    signature: str
    serial: str = ""  # hex; empty: every certificate of node_id issued before revoked_at

    def signed_bytes(self) -> bytes:
        return canonical_json({"format": FORMAT, "kind": KIND, "node_id": self.node_id, "serial": self.serial,
                               "reason": self.reason, "revoked_at": self.revoked_at, "key_id": self.key_id})

    def to_dict(self) -> dict[str, object]:
        return {"format": FORMAT, "kind": KIND, "node_id": self.node_id, "serial": self.serial,
                "reason": self.reason, "revoked_at": self.revoked_at, "key_id": self.key_id,
                "signature": self.signature}

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())

    def covers(self, node_id: str, serial: str, not_before: float) -> bool:
        """Whether a certificate of `node_id` with `serial`, valid from `not_before`, is revoked."""
        if node_id != self.node_id:
            return False
        if self.serial:
            return serial.lower() == self.serial
        return not_before < self.revoked_at

    def describe(self) -> str:
        # UTC, not the local zone: the text goes into replicated ledger state (and the node logs' times
        # are UTC too), so two replicas in different zones must write the same bytes.
        when = datetime.fromtimestamp(self.revoked_at, UTC).isoformat(timespec="seconds")
        which = f"certificate {self.serial}" if self.serial else "certificates issued before then"
        return f"{self.node_id} revoked at {when} ({which}) by operator key {self.key_id}: {self.reason}"


def sign_revocation(key: SigningKey, node_id: str, *, reason: str, now: float,
                    serial: str = "") -> Revocation:
    """An operator's revocation of `node_id` (its `serial` only, if given). Only an operator key
    passes verification; any other key's document is refused by every node."""
    unsigned = Revocation(node_id=node_id, reason=reason, revoked_at=float(now), key_id=key.key_id,
                          signature="0" * (2 * SIGNATURE_BYTES), serial=serial.lower())
    _check_fields(unsigned)
    return Revocation(**{**unsigned.__dict__, "signature": key.sign(unsigned.signed_bytes()).hex()})


def parse_revocation(data: bytes | str) -> Revocation:
    """A revocation document from its JSON; RevocationError naming the field if malformed."""
    if isinstance(data, str):
        data = data.encode()
    if len(data) > MAX_DOCUMENT_BYTES:
        raise RevocationError(f"revocation document is {len(data)} bytes, at most {MAX_DOCUMENT_BYTES}")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RevocationError(f"revocation is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RevocationError("revocation must be a JSON object")
    expected = {"format", "kind", "node_id", "serial", "reason", "revoked_at", "key_id", "signature"}
    if set(doc) != expected:
        missing, extra = sorted(expected - set(doc)), sorted(set(doc) - expected)
        raise RevocationError(f"revocation fields: missing {missing}, unexpected {extra}")
    if doc["format"] != FORMAT or doc["kind"] != KIND:
        raise RevocationError(f"not a format-{FORMAT} {KIND} document")
    revoked_at = doc["revoked_at"]
    if isinstance(revoked_at, bool) or not isinstance(revoked_at, int | float):
        raise RevocationError("revoked_at must be a number of seconds")
    for name in ("node_id", "serial", "reason", "key_id", "signature"):
        if not isinstance(doc[name], str):
            raise RevocationError(f"{name} must be a string")
    revocation = Revocation(node_id=doc["node_id"], reason=doc["reason"], revoked_at=float(revoked_at),
                            key_id=doc["key_id"], signature=doc["signature"], serial=doc["serial"])
    _check_fields(revocation)
    return revocation


def verify_revocation(revocation: Revocation, trusted: TrustedKeys) -> None:
    """Return if a trusted fleet OPERATOR key signed `revocation`; RevocationError otherwise."""
    try:
        signature = bytes.fromhex(revocation.signature)
    except ValueError:
        raise RevocationError(f"revocation of {revocation.node_id}: signature is not hex") from None
    try:
        trusted.verify(KeyRole.OPERATOR, revocation.signed_bytes(), signature, revocation.key_id)
    except SignatureError as exc:
        raise RevocationError(f"revocation of {revocation.node_id} refused: {exc}") from None


def _check_fields(revocation: Revocation) -> None:
    node_id = revocation.node_id
    if not node_id or len(node_id) > 63 or not set(node_id) <= _NAME_CHARS or not node_id[0].isalnum():
        raise RevocationError(f"node_id {node_id!r} is not a node name")
    if revocation.serial and (len(revocation.serial) > 40 or not all(c in "0123456789abcdef"
                                                                      for c in revocation.serial)):
        raise RevocationError(f"serial {revocation.serial!r} is not a certificate serial in hex")
    if not revocation.reason.strip() or len(revocation.reason) > MAX_REASON_CHARS:
        raise RevocationError(f"reason must be 1-{MAX_REASON_CHARS} characters: say why the node is revoked")
    if not math.isfinite(revocation.revoked_at) or revocation.revoked_at <= 0:
        raise RevocationError("revoked_at must be a positive time")


class RevocationSet:
    """The revocations a node knows, each verified against the fleet's operator keys. Grow-only."""

    def __init__(self, trusted: TrustedKeys, revocations: Iterable[Revocation] = ()) -> None:
        self._trusted = trusted
        self._by_signature: dict[str, Revocation] = {}
        self._node_ids: frozenset[str] = frozenset()
        self._whole_ids: frozenset[str] = frozenset()  # ids with a revocation of every certificate
        for revocation in revocations:
            self.add(revocation)

    def add(self, revocation: Revocation) -> bool:
        """Verify and add; True if it was new. RevocationError if not an operator's."""
        if revocation.signature in self._by_signature:
            return False
        verify_revocation(revocation, self._trusted)
        if len(self._by_signature) >= MAX_REVOCATIONS:
            raise RevocationError(f"more than {MAX_REVOCATIONS} revocations: refusing more")
        self._by_signature[revocation.signature] = revocation
        self._node_ids = self._node_ids | {revocation.node_id}
        if not revocation.serial:
            self._whole_ids = self._whole_ids | {revocation.node_id}
        return True

    def merge(self, revocations: Iterable[Revocation]) -> list[Revocation]:
        """Add every valid one of `revocations`; return those that were new. Invalid ones raise
        after the valid ones before them were added (the caller logs the refusal)."""
        return [r for r in revocations if self.add(r)]

    def revoked(self, node_id: str, serial: str = "", not_before: float = 0.0) -> Revocation | None:
        """The revocation covering this certificate, or None."""
        if node_id not in self._node_ids:
            return None
        for revocation in self._by_signature.values():
            if revocation.covers(node_id, serial, not_before):
                return revocation
        return None

    def node_ids(self) -> frozenset[str]:
        """Every node id with a revocation (of some certificate of it)."""
        return self._node_ids

    def revoked_ids(self) -> frozenset[str]:
        """Node ids whose certificates are all revoked (a revocation without a serial). A revocation
        of one serial (an old certificate after `mesh fleet renew`) leaves the node itself trusted: its
        other certificates are judged one by one (`revoked`)."""
        return self._whole_ids

    def __iter__(self) -> Iterator[Revocation]:
        return iter(sorted(self._by_signature.values(), key=lambda r: (r.revoked_at, r.signature)))

    def __len__(self) -> int:
        return len(self._by_signature)

    @property
    def digest(self) -> str:
        """sha256 over the sorted signatures: equal digests, equal sets."""
        return hashlib.sha256("".join(sorted(self._by_signature)).encode()).hexdigest()

    def to_json(self) -> bytes:
        return json.dumps([r.to_dict() for r in self]).encode()

    @classmethod
    def from_json(cls, data: bytes, trusted: TrustedKeys) -> RevocationSet:
        """A set from `to_json` bytes (a file, a peer's answer); every entry verified."""
        try:
            docs = json.loads(data or b"[]")
        except (ValueError, UnicodeDecodeError) as exc:
            raise RevocationError(f"revocation list is not JSON: {exc}") from None
        if not isinstance(docs, list) or len(docs) > MAX_REVOCATIONS:
            raise RevocationError(f"revocation list must be a JSON list of at most {MAX_REVOCATIONS}")
        return cls(trusted, (parse_revocation(canonical_json(d)) for d in docs))
