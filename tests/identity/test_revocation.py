"""Operator-signed revocations alone: documents, signatures, the grow-only set."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.identity.revocation import (
    RevocationError,
    RevocationSet,
    parse_revocation,
    sign_revocation,
    verify_revocation,
)
from mesh.identity.signing import KeyRole, SigningKey, TrustedKeys

OPERATOR = SigningKey.generate(KeyRole.OPERATOR)
PUBLISHER = SigningKey.generate(KeyRole.PUBLISHER)
TRUSTED = TrustedKeys([OPERATOR.verify_key, PUBLISHER.verify_key])

node_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
reasons = st.text(min_size=1, max_size=80).filter(lambda r: r.strip())


@given(node_ids, reasons, st.floats(1.0, 4e9))
def test_an_operator_revocation_round_trips_and_verifies(node_id, reason, now):
    revocation = sign_revocation(OPERATOR, node_id, reason=reason, now=now)
    parsed = parse_revocation(revocation.to_json())
    assert parsed == revocation
    verify_revocation(parsed, TRUSTED)


def test_only_an_operator_key_can_revoke():
    node_key = SigningKey.generate(KeyRole.NODE)
    stranger = SigningKey.generate(KeyRole.OPERATOR)  # an operator key of another fleet
    for key in (PUBLISHER, node_key, stranger):
        with pytest.raises(RevocationError, match="refused"):
            verify_revocation(sign_revocation(key, "cam-07", reason="stolen", now=1000.0), TRUSTED)
    genuine = sign_revocation(OPERATOR, "cam-07", reason="stolen", now=1000.0)
    doc = json.loads(genuine.to_json())
    doc["node_id"] = "cam-08"  # a valid signature moved onto another node
    with pytest.raises(RevocationError, match="refused"):
        verify_revocation(parse_revocation(json.dumps(doc)), TRUSTED)


@pytest.mark.parametrize(("change", "message"), [
    ({"node_id": ""}, "not a node name"), ({"reason": " "}, "reason"), ({"serial": "xyz"}, "serial"),
    ({"revoked_at": "now"}, "revoked_at"), ({"kind": "other"}, "fleetmesh.revocation"),
    ({"extra": 1}, "unexpected"), ({"revoked_at": -1}, "positive"),
])
def test_malformed_documents_name_the_field(change, message):
    doc = json.loads(sign_revocation(OPERATOR, "cam-07", reason="stolen", now=1000.0).to_json())
    doc.update(change)
    with pytest.raises(RevocationError, match=message):
        parse_revocation(json.dumps(doc))


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_revocation_error(data):
    with contextlib.suppress(RevocationError):
        parse_revocation(data)


def test_a_revocation_covers_older_certificates_or_one_serial():
    everything = sign_revocation(OPERATOR, "cam-07", reason="stolen", now=1000.0)
    assert everything.covers("cam-07", "ab12", not_before=999.0)
    assert not everything.covers("cam-07", "ab12", not_before=1001.0)  # a replacement enrolled later
    assert not everything.covers("cam-08", "ab12", not_before=999.0)
    one = sign_revocation(OPERATOR, "cam-07", reason="key leaked", now=1000.0, serial="AB12")
    assert one.covers("cam-07", "ab12", not_before=2000.0)
    assert not one.covers("cam-07", "ab13", not_before=0.0)


@given(st.lists(st.tuples(node_ids, reasons), max_size=6), st.randoms())
def test_sets_merge_by_union_in_any_order(entries, rng):
    revocations = [sign_revocation(OPERATOR, n, reason=r, now=1000.0 + i) for i, (n, r) in enumerate(entries)]
    a, b = RevocationSet(TRUSTED), RevocationSet(TRUSTED)
    shuffled = list(revocations)
    rng.shuffle(shuffled)
    a.merge(revocations)
    b.merge(shuffled[: len(shuffled) // 2])
    b.merge(RevocationSet.from_json(a.to_json(), TRUSTED))
    assert a.digest == b.digest and len(a) == len(b) == len({r.signature for r in revocations})
    assert not any(a.add(r) for r in revocations)  # grow-only, idempotent


def test_a_list_with_a_forged_entry_is_refused_by_name():
    good = sign_revocation(OPERATOR, "cam-07", reason="stolen", now=1000.0)
    forged = sign_revocation(SigningKey.generate(KeyRole.OPERATOR), "cam-01", reason="spite", now=1000.0)
    data = json.dumps([good.to_dict(), forged.to_dict()]).encode()
    with pytest.raises(RevocationError, match="cam-01"):
        RevocationSet.from_json(data, TRUSTED)


def test_a_revoked_serial_leaves_the_node_itself_trusted():
    """After `mesh fleet renew` the operator revokes the old serial: that certificate is refused, but
    the node (its new certificate) is not revoked as a whole: not seen dead, not removed from its group."""
    revocations = RevocationSet(TRUSTED)
    revocations.add(sign_revocation(OPERATOR, "cam-07", reason="renewed; old key retired", now=1000.0,
                                    serial="4d16884146"))
    assert revocations.revoked("cam-07", "4d16884146", 10.0) is not None
    assert revocations.revoked("cam-07", "77aa", 10.0) is None
    assert "cam-07" in revocations.node_ids() and "cam-07" not in revocations.revoked_ids()
    revocations.add(sign_revocation(OPERATOR, "cam-07", reason="stolen", now=2000.0))
    assert "cam-07" in revocations.revoked_ids()


def test_the_description_is_the_same_in_every_time_zone(monkeypatch):
    """It is written into replicated ledger state (a member's removal): replicas in different zones
    must write the same bytes."""
    revocation = sign_revocation(OPERATOR, "cam-07", reason="stolen", now=1000.0)
    seen = set()
    for zone in ("UTC", "Europe/Berlin", "America/Los_Angeles"):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        seen.add(revocation.describe())
    monkeypatch.undo()
    time.tzset()
    assert len(seen) == 1, seen
