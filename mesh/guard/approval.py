"""Operator approvals (and denials) of held decisions: codec, signing, verification. Pure.

An `Approval` binds one decision digest, says approve or deny, and carries an
issue time, an expiry and a nonce. The operator signs it with an Ed25519 key of
role OPERATOR; `verify_approval` accepts it only if

- it is well formed (strict codec, `expires_at > issued_at`),
- it names exactly the decision being approved (digest and id),
- its key is a trusted OPERATOR key (a node or publisher key is refused even
  if its signature is good),
- the signature covers these exact bytes,
- `now < expires_at`,
- its nonce has not been used before.

Each refusal is an `ApprovalRefused` subclass with a stable `.reason` code the
audit log records. `verify_approval` does not remember the nonce: the caller
(the replicated ledger) adds it to its used set once it acts on the approval,
so "accepted once" is a property of the replicated state, identical on every
replica.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Container
from typing import Any

from mesh.guard.core import (
    DECISION_ID_HEX_CHARS,
    MAX_REASON_CHARS,
    Decision,
    GuardError,
    as_seconds,
    expect_fields,
    is_sha256_hex,
    is_text,
)
from mesh.identity.signing import (
    KEY_ID_HEX_CHARS,
    SIGNATURE_BYTES,
    KeyRole,
    KeyRoleError,
    SignatureError,
    SigningKey,
    TrustedKeys,
    UnknownKeyError,
    VerifyKey,
    canonical_json,
)

APPROVAL_FORMAT = 1
MAX_APPROVAL_TTL_S = 7 * 24 * 3600.0
# Domain separation: an operator signature over an approval can never be replayed as a signature over
# some other canonical JSON document the fleet signs (manifests, plans), and vice versa.
_SIGNING_CONTEXT = b"fleetmesh approval v1\n"

_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
_KEY_ID_RE = re.compile(rf"[0-9a-f]{{{KEY_ID_HEX_CHARS}}}")
_DECISION_ID_RE = re.compile(rf"[0-9a-f]{{{DECISION_ID_HEX_CHARS}}}")
_SIGNATURE_RE = re.compile(rf"[0-9a-f]{{{2 * SIGNATURE_BYTES}}}")
_FIELDS = frozenset(
    {
        "format",
        "decision_id",
        "decision_digest",
        "approve",
        "reason",
        "issued_at",
        "expires_at",
        "nonce",
        "key_id",
        "signature",
    }
)


class ApprovalRefused(GuardError):
    """An approval was refused; `.reason` is the stable code written to the audit log."""

    reason = "refused"


class MalformedApproval(ApprovalRefused):
    reason = "malformed"


class WrongDecision(ApprovalRefused):
    reason = "wrong_decision"


class UnknownApprovalKey(ApprovalRefused):
    reason = "unknown_key"


class NotOperatorKey(ApprovalRefused):
    reason = "not_operator_key"


class ForgedApproval(ApprovalRefused):
    reason = "forged"


class ExpiredApproval(ApprovalRefused):
    reason = "expired"


class ReplayedApproval(ApprovalRefused):
    reason = "replayed"


REFUSAL_REASONS = frozenset(
    c.reason
    for c in (
        MalformedApproval,
        WrongDecision,
        UnknownApprovalKey,
        NotOperatorKey,
        ForgedApproval,
        ExpiredApproval,
        ReplayedApproval,
    )
)


@dataclasses.dataclass(frozen=True)
class Approval:
    """An operator's signed yes (`approve=True`) or no to exactly one decision."""

    decision_id: str
    decision_digest: str
    approve: bool
    reason: str
    issued_at: float
    expires_at: float
    nonce: str
    key_id: str
    signature: str  # hex of the 64-byte Ed25519 signature over `signed_bytes()`

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def verb(self) -> str:
        return "approval" if self.approve else "denial"

    def body(self) -> dict[str, Any]:
        """Every field but the signature: what is signed."""
        return {
            "format": APPROVAL_FORMAT,
            "decision_id": self.decision_id,
            "decision_digest": self.decision_digest,
            "approve": self.approve,
            "reason": self.reason,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "nonce": self.nonce,
            "key_id": self.key_id,
        }

    def signed_bytes(self) -> bytes:
        return _SIGNING_CONTEXT + canonical_json(self.body())

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature}

    @classmethod
    def from_dict(cls, doc: object) -> Approval:
        """Parse strictly; raise MalformedApproval naming the bad field."""
        d = expect_fields(doc, "approval", _FIELDS, MalformedApproval)
        if type(d["format"]) is not int or d["format"] != APPROVAL_FORMAT:
            raise MalformedApproval(
                f"approval.format: unsupported format {d['format']!r}; this node reads format 1"
            )
        issued_at = _epoch_seconds(d, "issued_at")
        expires_at = _epoch_seconds(d, "expires_at")
        return cls(
            decision_id=d["decision_id"],
            decision_digest=d["decision_digest"],
            approve=d["approve"],
            reason=d["reason"],
            issued_at=issued_at,
            expires_at=expires_at,
            nonce=d["nonce"],
            key_id=d["key_id"],
            signature=d["signature"],
        )


def _epoch_seconds(d: dict[str, Any], name: str) -> float:
    """Field `name` of a parsed approval as seconds since the epoch; MalformedApproval if it is not."""
    v = d[name]
    seconds = as_seconds(v)
    if seconds is None:
        raise MalformedApproval(f"approval.{name}: expected seconds since the epoch >= 0, got {v!r}")
    return seconds


def _validate(a: Approval) -> None:
    def check(name: str, pattern: re.Pattern[str], what: str) -> None:
        value = getattr(a, name)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise MalformedApproval(f"approval.{name}: {value!r} is not {what}")

    check("decision_id", _DECISION_ID_RE, f"a decision id ({DECISION_ID_HEX_CHARS} hex chars)")
    if not is_sha256_hex(a.decision_digest):
        raise MalformedApproval(f"approval.decision_digest: {a.decision_digest!r} is not a sha256 hex digest")
    if not a.decision_digest.startswith(a.decision_id):
        raise MalformedApproval(
            "approval.decision_id: does not match the first characters of decision_digest"
        )
    check("nonce", _NONCE_RE, "a nonce (8-64 of A-Z a-z 0-9 _ -)")
    check("key_id", _KEY_ID_RE, f"a key id ({KEY_ID_HEX_CHARS} hex chars)")
    check("signature", _SIGNATURE_RE, f"a hex Ed25519 signature ({2 * SIGNATURE_BYTES} hex chars)")
    if type(a.approve) is not bool:
        raise MalformedApproval(f"approval.approve: expected true or false, got {a.approve!r}")
    if not is_text(a.reason, MAX_REASON_CHARS):
        raise MalformedApproval(f"approval.reason: expected text of at most {MAX_REASON_CHARS} characters")
    for name in ("issued_at", "expires_at"):
        v = getattr(a, name)
        if type(v) is not float or not math.isfinite(v) or v < 0:
            raise MalformedApproval(f"approval.{name}: expected seconds since the epoch >= 0, got {v!r}")
    ttl_s = a.expires_at - a.issued_at
    if not 0 < ttl_s <= MAX_APPROVAL_TTL_S:
        raise MalformedApproval(
            f"approval: expires_at - issued_at is {ttl_s:.0f} s; the limit is {MAX_APPROVAL_TTL_S:.0f} s"
        )


def sign_approval(
    key: SigningKey,
    decision: Decision,
    *,
    now: float,
    ttl_s: float,
    nonce: str,
    approve: bool = True,
    reason: str = "",
) -> Approval:
    """Sign an approval (or, with `approve=False`, a denial) of exactly `decision`, valid for `ttl_s`.

    Any key can sign; only a trusted OPERATOR key passes `verify_approval`.
    `nonce` must be fresh (the admin client draws it from `secrets`).
    """
    digest = decision.digest()
    unsigned = Approval(
        decision_id=decision.decision_id,
        decision_digest=digest,
        approve=approve,
        reason=reason,
        issued_at=float(now),
        expires_at=float(now) + float(ttl_s),
        nonce=nonce,
        key_id=key.key_id,
        signature="0" * (2 * SIGNATURE_BYTES),
    )
    signature = key.sign(unsigned.signed_bytes()).hex()
    return dataclasses.replace(unsigned, signature=signature)


def verify_approval(
    approval: Approval,
    decision: Decision,
    trusted: TrustedKeys,
    *,
    now: float,
    used_nonces: Container[str],
) -> VerifyKey:
    """Return the operator key that validly approved (or denied) exactly `decision` at `now`.

    Raises an ApprovalRefused subclass otherwise; the checks run in the order of
    the module docstring, so a forged approval is reported as forged, not as
    expired or replayed.
    """
    if not isinstance(approval, Approval):
        raise MalformedApproval(f"expected an Approval, got {type(approval).__name__}")
    digest = decision.digest()
    if approval.decision_digest != digest:
        raise WrongDecision(
            f"{approval.verb} {approval.nonce} is for decision {approval.decision_id}, "
            f"not {decision.decision_id}; sign an approval of this decision's digest"
        )
    try:
        key = trusted.verify(
            KeyRole.OPERATOR, approval.signed_bytes(), bytes.fromhex(approval.signature), approval.key_id
        )
    except UnknownKeyError as exc:
        raise UnknownApprovalKey(f"{approval.verb} of {decision.decision_id} refused: {exc}") from None
    except KeyRoleError as exc:
        raise NotOperatorKey(f"{approval.verb} of {decision.decision_id} refused: {exc}") from None
    except SignatureError as exc:
        raise ForgedApproval(f"{approval.verb} of {decision.decision_id} refused: {exc}") from None
    if now >= approval.expires_at:
        raise ExpiredApproval(
            f"{approval.verb} of {decision.decision_id} by key {approval.key_id} expired at "
            f"{approval.expires_at:.0f} (now {now:.0f}); sign a new one"
        )
    if approval.nonce in used_nonces:
        raise ReplayedApproval(
            f"{approval.verb} of {decision.decision_id} with nonce {approval.nonce} was already used; "
            "an approval is accepted once"
        )
    return key
