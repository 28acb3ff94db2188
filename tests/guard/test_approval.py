"""Operator approvals: what is accepted, and every way one is refused (with the audited reason code)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.guard.approval import (
    REFUSAL_REASONS,
    Approval,
    ApprovalRefused,
    ExpiredApproval,
    ForgedApproval,
    MalformedApproval,
    NotOperatorKey,
    ReplayedApproval,
    UnknownApprovalKey,
    WrongDecision,
    sign_approval,
    verify_approval,
)
from mesh.identity.signing import KeyRole, SigningKey, TrustedKeys
from tests.guard.test_core import make_decision
from tests.strategies import json_values

OPERATOR = SigningKey.generate(KeyRole.OPERATOR)
NODE = SigningKey.generate(KeyRole.NODE)
PUBLISHER = SigningKey.generate(KeyRole.PUBLISHER)
STRANGER = SigningKey.generate(KeyRole.OPERATOR)  # an operator key of some other fleet
TRUSTED = TrustedKeys([OPERATOR.verify_key, NODE.verify_key, PUBLISHER.verify_key])

DECISION = make_decision(("cam-1", "node-1", "node-2"), ("cam-2", "node-1", "node-3"))
OTHER = make_decision(("cam-1", "node-1", "node-2"), ("cam-2", "node-1", "node-3"), nonce="nonce-0002")


def approve(
    key: SigningKey = OPERATOR, decision=DECISION, *, now=2000.0, ttl_s=600.0, nonce="approval-1", **kw
):
    return sign_approval(key, decision, now=now, ttl_s=ttl_s, nonce=nonce, **kw)


def check(approval, decision=DECISION, *, now=2100.0, used=frozenset()):
    return verify_approval(approval, decision, TRUSTED, now=now, used_nonces=used)


def test_valid_approval_returns_the_operator_key():
    a = approve(reason="checked the cameras")
    assert check(a) == OPERATOR.verify_key
    assert a.decision_digest == DECISION.digest() and a.decision_id == DECISION.decision_id
    assert a.key_id == OPERATOR.key_id and a.approve is True
    assert (a.issued_at, a.expires_at) == (2000.0, 2600.0)
    denial = approve(approve=False, nonce="denial-01")
    assert check(denial) == OPERATOR.verify_key and denial.verb == "denial"


def test_round_trip_through_json():
    a = approve()
    again = Approval.from_dict(json.loads(json.dumps(a.to_dict())))
    assert again == a
    assert check(again) == OPERATOR.verify_key


def _flip_signature(a: Approval) -> Approval:
    sig = bytearray(bytes.fromhex(a.signature))
    sig[5] ^= 0x01
    return dataclasses.replace(a, signature=sig.hex())


@pytest.mark.parametrize(
    ("make", "refusal", "kwargs"),
    [
        (lambda: _flip_signature(approve()), ForgedApproval, {}),
        (lambda: dataclasses.replace(approve(), reason="edited after signing"), ForgedApproval, {}),
        (lambda: dataclasses.replace(approve(), expires_at=99999.0), ForgedApproval, {}),
        (lambda: dataclasses.replace(approve(), approve=False), ForgedApproval, {}),
        # A node key with a perfectly good signature is still not an operator.
        (lambda: approve(NODE), NotOperatorKey, {}),
        (lambda: approve(PUBLISHER), NotOperatorKey, {}),
        (lambda: approve(STRANGER), UnknownApprovalKey, {}),
        (lambda: approve(), ExpiredApproval, {"now": 2600.0}),
        (lambda: approve(), ExpiredApproval, {"now": 10_000.0}),
        (lambda: approve(), ReplayedApproval, {"used": frozenset({"approval-1"})}),
        (lambda: approve(decision=OTHER), WrongDecision, {}),
    ],
)
def test_refusals(make, refusal, kwargs):
    with pytest.raises(refusal) as info:
        check(make(), **kwargs)
    assert info.value.reason == refusal.reason
    assert info.value.reason in REFUSAL_REASONS
    assert DECISION.decision_id in str(info.value)


def test_just_before_expiry_is_accepted():
    assert check(approve(), now=2599.999) == OPERATOR.verify_key


def test_forgery_is_reported_as_forgery_even_when_expired_and_replayed():
    with pytest.raises(ForgedApproval):
        check(_flip_signature(approve()), now=10_000.0, used=frozenset({"approval-1"}))


def test_a_signature_made_for_another_decision_does_not_transfer():
    """Rewriting the digest fields to point at another decision breaks the signature."""
    a = approve(decision=OTHER)
    moved = dataclasses.replace(a, decision_id=DECISION.decision_id, decision_digest=DECISION.digest())
    with pytest.raises(ForgedApproval):
        check(moved)


def test_operator_signature_over_the_bare_body_is_not_an_approval():
    """Domain separation: signing the canonical body without the approval context does not verify."""
    from mesh.identity.signing import canonical_json

    a = approve()
    bare = dataclasses.replace(a, signature=OPERATOR.sign(canonical_json(a.body())).hex())
    with pytest.raises(ForgedApproval):
        check(bare)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("decision_id", "abc", "decision_id"),
        ("decision_id", "0" * 16, "decision_id"),  # not the digest's prefix
        ("decision_digest", "g" * 64, "decision_digest"),
        ("approve", "yes", "approve"),
        ("approve", 1, "approve"),
        ("issued_at", -5, "issued_at"),
        ("issued_at", 10**400, "issued_at"),
        ("expires_at", 1999.0, "expires_at - issued_at"),
        ("expires_at", 2000.0 + 8 * 24 * 3600, "expires_at - issued_at"),
        ("nonce", "n", "nonce"),
        ("key_id", "XYZ", "key_id"),
        ("signature", "00", "signature"),
        ("reason", 5, "reason"),
        ("format", 2, "format"),
    ],
)
def test_malformed_fields(field, value, needle):
    doc = approve().to_dict()
    doc[field] = value
    with pytest.raises(MalformedApproval, match=needle) as info:
        Approval.from_dict(doc)
    assert info.value.reason == "malformed"


def test_missing_and_unknown_fields():
    doc = approve().to_dict()
    del doc["nonce"]
    with pytest.raises(MalformedApproval, match="missing field"):
        Approval.from_dict(doc)
    doc = approve().to_dict() | {"scope": "all"}
    with pytest.raises(MalformedApproval, match="unknown field"):
        Approval.from_dict(doc)


def test_ttl_must_be_positive_when_signing():
    with pytest.raises(MalformedApproval):
        approve(ttl_s=0)


_json = json_values()


@settings(max_examples=200, deadline=None)
@given(_json)
def test_from_dict_never_crashes_on_arbitrary_json(doc):
    with pytest.raises(MalformedApproval):
        Approval.from_dict(doc)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_single_field_change_is_refused(data):
    """Change one field of a valid approval to arbitrary JSON: malformed, or a verification refusal."""
    doc = approve().to_dict()
    key = data.draw(st.sampled_from(sorted(doc)))
    value = data.draw(_json)
    if value == doc[key]:  # 2000 == 2000.0 is the same approval
        return
    doc[key] = value
    with pytest.raises(ApprovalRefused):
        check(Approval.from_dict(doc))
