"""The replicated ledger: the guard inside apply, approvals accepted once, identical replicas, snapshots."""

from __future__ import annotations

import contextlib
import json
import logging
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.consensus.commands import (
    ApproveCommand,
    CommandError,
    ProposeCommand,
    RemoveMemberCommand,
    approve_command,
    decode_command,
    deny_command,
    encode_command,
    expire_command,
    propose_command,
    remove_member_command,
    set_routes_command,
    withdraw_command,
)
from mesh.consensus.ledger import DecisionLedger, Outcome, SnapshotError
from mesh.guard.approval import sign_approval
from mesh.guard.core import DecisionKind, Limits, Policy, decide
from mesh.identity.revocation import Revocation, sign_revocation
from mesh.identity.signing import KeyRole, SigningKey, TrustedKeys, canonical_json
from tests.guard.test_core import make_decision
from tests.strategies import json_values

OPERATOR = SigningKey.generate(KeyRole.OPERATOR)
NODE = SigningKey.generate(KeyRole.NODE)
PUBLISHER = SigningKey.generate(KeyRole.PUBLISHER)
TRUSTED = TrustedKeys([OPERATOR.verify_key, NODE.verify_key, PUBLISHER.verify_key])
POLICY = Policy(
    limits={
        DecisionKind.MOVE_STREAMS: Limits(max_nodes=2, max_fraction=0.5, max_streams=3),
        DecisionKind.REASSIGN_STREAMS: Limits(max_nodes=3, max_fraction=0.6, max_streams=4),
        DecisionKind.SET_ALLOCATION: Limits(max_nodes=1, max_fraction=0.5, max_streams=0),
    },
    hold_ttl_s=600.0,
)
NODES = [f"node-{i}" for i in range(1, 6)]
T0 = 1000.0


def ledger() -> DecisionLedger:
    return DecisionLedger(group="site-a", policy=POLICY, group_size=len(NODES), trusted=TRUSTED)


def initial_routes() -> bytes:
    """cam-0..cam-9: two cameras per node."""
    return set_routes_command(
        {f"cam-{i}": NODES[i // 2] for i in range(10)}, allocations={"node-1": 4}, now=T0
    )


@pytest.fixture
def replicas():
    """Two replicas fed the same commands; `feed` returns the first one's result and checks they agree."""
    a, b = ledger(), ledger()

    def feed(command: bytes):
        ra, rb = a.apply(command), b.apply(command)
        assert ra == rb
        assert a.state_digest() == b.state_digest()
        return ra

    feed(initial_routes())
    feed.a, feed.b = a, b
    return feed


def small_move(nonce="nonce-small", at=T0 + 10):
    return make_decision(("cam-0", "node-1", "node-2"), proposed_at=at, nonce=nonce)  # 2 nodes, 1 stream


def big_reassign(nonce="nonce-big1", at=T0 + 10):
    # node-3 died: its two streams go to two survivors -> 3 nodes of 5 = 60%, within the reassign scope.
    return make_decision(
        ("cam-4", "node-3", "node-1"),
        ("cam-5", "node-3", "node-2"),
        kind=DecisionKind.REASSIGN_STREAMS,
        proposed_at=at,
        nonce=nonce,
        proposer="node-4",
    )


def big_move(nonce="nonce-big2", at=T0 + 10):
    """Moves 4 streams over 3 nodes: above the move_streams scope on every count."""
    return make_decision(
        ("cam-0", "node-1", "node-4"),
        ("cam-1", "node-1", "node-4"),
        ("cam-2", "node-2", "node-4"),
        ("cam-3", "node-2", "node-4"),
        proposed_at=at,
        nonce=nonce,
        proposer="node-5",
    )


def approval_of(decision, key=OPERATOR, *, now=T0 + 60, nonce="approval-01", approve=True, ttl_s=300.0):
    return sign_approval(
        key, decision, now=now, ttl_s=ttl_s, nonce=nonce, approve=approve, reason="looked fine"
    )


def kinds(result):
    return [e.kind for e in result.audit]


def test_initial_assignment(replicas):
    a = replicas.a
    assert a.routes()["cam-9"] == "node-5" and len(a.routes()) == 10
    assert a.allocations() == {"node-1": 4}
    # Re-sending the same assignment is a noop; trying to move a stream through it is refused.
    assert replicas(initial_routes()).outcome is Outcome.NOOP
    r = replicas(set_routes_command({"cam-0": "node-5"}, now=T0 + 1))
    assert r.outcome is Outcome.REFUSED and "propose move_streams" in r.message
    assert a.routes()["cam-0"] == "node-1"


def test_within_scope_is_applied_at_once(replicas):
    r = replicas(propose_command(small_move()))
    assert r.outcome is Outcome.APPLIED
    assert kinds(r) == ["proposed", "applied"]
    assert r.audit[1].payload["approved_by"] is None
    assert replicas.a.routes()["cam-0"] == "node-2"
    assert replicas.a.pending() == ()
    assert replicas.a.outcome_of(small_move().decision_id) == "applied"


def test_reassign_of_a_dead_node_within_scope(replicas):
    r = replicas(propose_command(big_reassign()))
    assert r.outcome is Outcome.APPLIED, r.message
    assert replicas.a.routes()["cam-4"] == "node-1" and replicas.a.routes()["cam-5"] == "node-2"


def test_above_scope_is_held_then_applied_after_approval(replicas, caplog):
    d = big_move()
    with caplog.at_level(logging.WARNING, logger="mesh.guard"):
        r = replicas(propose_command(d))
    assert r.outcome is Outcome.HELD and r.decision_id == d.decision_id
    assert kinds(r) == ["proposed", "held"]
    assert replicas.a.routes()["cam-0"] == "node-1"  # nothing moved
    (held,) = replicas.a.pending()
    assert held.decision == d and held.expires_at == d.proposed_at + 600.0
    assert held.exceeded == (
        "moves 4 streams, policy allows 3 for move_streams",
        "affects 3 nodes, policy allows 2 for move_streams",
        "affects 60% of the group (3 of 5 nodes), policy allows 50% for move_streams",
    )
    # One warning per replica, naming the decision, its scope and the limits.
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert d.decision_id in warnings[0] and "3 nodes (60% of 5), 4 streams" in warnings[0]
    assert "policy allows 3 for move_streams" in warnings[0]
    assert f"mesh admin approve {d.decision_id}" in warnings[0]

    r = replicas(approve_command(approval_of(d), now=T0 + 61))
    assert r.outcome is Outcome.APPLIED
    assert kinds(r) == ["approved", "applied"]
    assert r.audit[0].payload["key_id"] == OPERATOR.key_id
    assert r.audit[1].payload["approved_by"] == OPERATOR.key_id
    assert [replicas.a.routes()[f"cam-{i}"] for i in range(4)] == ["node-4"] * 4
    assert replicas.a.pending() == ()
    assert (
        replicas.a.history()[-1].outcome == "applied" and replicas.a.history()[-1].key_id == OPERATOR.key_id
    )


def test_any_node_may_propose_but_only_the_operator_unblocks(replicas):
    """The same held decision proposed twice (by two nodes relaying it) is one hold."""
    d = big_move()
    assert replicas(propose_command(d)).outcome is Outcome.HELD
    assert replicas(propose_command(d, now=T0 + 20)).outcome is Outcome.NOOP
    assert len(replicas.a.pending()) == 1


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (NODE, "not_operator_key"),
        (PUBLISHER, "not_operator_key"),
        (SigningKey.generate(KeyRole.OPERATOR), "unknown_key"),
    ],
)
def test_non_operator_approvals_are_refused_audited_and_leave_the_hold(replicas, key, reason):
    d = big_move()
    replicas(propose_command(d))
    r = replicas(approve_command(approval_of(d, key), now=T0 + 61))
    assert r.outcome is Outcome.REFUSED
    assert kinds(r) == ["refused"]
    assert r.audit[0].payload["reason"] == reason
    assert r.audit[0].payload["key_id"] == key.key_id
    assert replicas.a.routes()["cam-0"] == "node-1"
    assert [h.decision_id for h in replicas.a.pending()] == [d.decision_id]
    # A real operator approval still goes through afterwards.
    assert (
        replicas(approve_command(approval_of(d, nonce="approval-02"), now=T0 + 62)).outcome is Outcome.APPLIED
    )


def test_forged_approval_bytes_are_refused(replicas):
    d = big_move()
    replicas(propose_command(d))
    doc = json.loads(approve_command(approval_of(d), now=T0 + 61))
    sig = bytearray(bytes.fromhex(doc["approval"]["signature"]))
    sig[0] ^= 0xFF
    doc["approval"]["signature"] = sig.hex()
    r = replicas(canonical_json(doc))
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "forged"
    assert replicas.a.pending()


def test_expired_approval_is_refused(replicas):
    d = big_move()
    replicas(propose_command(d))
    r = replicas(approve_command(approval_of(d, ttl_s=30.0), now=T0 + 91))
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "expired"
    assert replicas.a.pending()


def test_replayed_approval_is_refused(replicas):
    d = big_move()
    replicas(propose_command(d))
    command = approve_command(approval_of(d), now=T0 + 61)
    assert replicas(command).outcome is Outcome.APPLIED
    r = replicas(command)
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "replayed"
    # A fresh approval of an already applied decision is refused too: it is accepted once.
    r = replicas(approve_command(approval_of(d, nonce="approval-02"), now=T0 + 62))
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "not_pending"
    assert "already applied" in r.message


def test_nonce_reuse_on_another_decision_is_replay(replicas):
    d1, d2 = big_move(), big_move(nonce="nonce-big3")
    replicas(propose_command(d1))
    replicas(propose_command(d2))
    assert replicas(approve_command(approval_of(d1), now=T0 + 61)).outcome is Outcome.APPLIED
    r = replicas(approve_command(approval_of(d2), now=T0 + 62))  # same approval nonce, other decision
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "replayed"


def test_denied_is_recorded_and_never_applied(replicas):
    d = big_move()
    replicas(propose_command(d))
    r = replicas(deny_command(approval_of(d, approve=False), now=T0 + 61))
    assert r.outcome is Outcome.DENIED and kinds(r) == ["denied"]
    assert r.audit[0].payload["key_id"] == OPERATOR.key_id
    assert replicas.a.pending() == () and replicas.a.routes()["cam-0"] == "node-1"
    assert replicas.a.outcome_of(d.decision_id) == "denied"
    assert replicas(propose_command(d, now=T0 + 70)).outcome is Outcome.NOOP
    r = replicas(approve_command(approval_of(d, nonce="approval-02"), now=T0 + 71))
    assert r.outcome is Outcome.REFUSED and replicas.a.routes()["cam-0"] == "node-1"


def test_a_deny_by_a_node_key_does_not_drop_the_hold(replicas):
    d = big_move()
    replicas(propose_command(d))
    r = replicas(deny_command(approval_of(d, NODE, approve=False), now=T0 + 61))
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "not_operator_key"
    assert replicas.a.pending()


def test_approval_for_an_unknown_decision_is_refused_and_audited(replicas):
    r = replicas(approve_command(approval_of(big_move()), now=T0 + 61))
    assert r.outcome is Outcome.REFUSED and r.audit[0].kind == "refused"
    assert r.audit[0].payload["reason"] == "not_pending"
    assert replicas.a.history()[-1].outcome == "refused"


def test_holds_expire_after_the_ttl(replicas):
    d = big_move()
    replicas(propose_command(d))
    assert replicas(expire_command(T0 + 10 + 599)).outcome is Outcome.NOOP
    r = replicas(expire_command(T0 + 10 + 600))
    assert r.outcome is Outcome.EXPIRED and kinds(r) == ["expired"]
    assert r.audit[0].payload["decision_id"] == d.decision_id
    assert replicas.a.pending() == () and replicas.a.outcome_of(d.decision_id) == "expired"
    r = replicas(approve_command(approval_of(d, now=T0 + 605), now=T0 + 611))
    assert r.outcome is Outcome.REFUSED and "already expired" in r.message
    assert replicas.a.routes()["cam-0"] == "node-1"


def test_a_late_approval_expires_the_hold_itself(replicas):
    d = big_move()
    replicas(propose_command(d))
    r = replicas(approve_command(approval_of(d, now=T0 + 600), now=T0 + 650))
    assert r.outcome is Outcome.REFUSED
    assert kinds(r) == ["expired", "refused"] and r.audit[1].payload["reason"] == "decision_expired"
    assert replicas.a.pending() == () and replicas.a.routes()["cam-0"] == "node-1"


def test_the_clock_never_runs_backwards(replicas):
    """A command stamped in the past cannot revive an expired approval."""
    d = big_move()
    replicas(propose_command(d))
    replicas(expire_command(T0 + 100))
    assert replicas.a.clock == T0 + 100
    r = replicas(approve_command(approval_of(d, ttl_s=30.0), now=T0 + 61))  # valid until T0+90 < clock
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "expired"
    assert replicas.a.clock == T0 + 100


def test_stale_and_foreign_proposals_are_refused(replicas):
    r = replicas(propose_command(small_move(at=T0 - 700), now=T0 + 10))
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "stale"
    other_site = make_decision(("cam-0", "node-1", "node-2"), group="site-b", proposed_at=T0 + 10)
    r = replicas(propose_command(other_site))
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "wrong_group"
    assert replicas.a.routes()["cam-0"] == "node-1"


def test_a_decision_made_stale_by_the_state_is_refused_even_when_approved(replicas):
    held = big_move()
    replicas(propose_command(held))
    # Meanwhile cam-0 moves within scope.
    assert replicas(propose_command(small_move(at=T0 + 20))).outcome is Outcome.APPLIED
    r = replicas(approve_command(approval_of(held), now=T0 + 61))
    assert r.outcome is Outcome.REFUSED and kinds(r) == ["approved", "refused"]
    assert "cam-0 is served by node-2, not by node-1" in r.message
    assert replicas.a.routes()["cam-1"] == "node-1"  # none of its moves happened
    assert replicas.a.pending() == ()
    # And a proposal that does not match the table is refused at once.
    r = replicas(propose_command(make_decision(("cam-9", "node-1", "node-2"), proposed_at=T0 + 30)))
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "state_changed"


def test_allocation_change(replicas):
    one = make_decision(kind=DecisionKind.SET_ALLOCATION, allocations=(("node-2", 3),), proposed_at=T0 + 5)
    assert replicas(propose_command(one)).outcome is Outcome.APPLIED
    two = make_decision(
        kind=DecisionKind.SET_ALLOCATION, allocations=(("node-3", 1), ("node-4", 1)), proposed_at=T0 + 6
    )
    assert replicas(propose_command(two)).outcome is Outcome.HELD
    assert replicas.a.allocations() == {"node-1": 4, "node-2": 3}


def test_forgetting_old_outcomes_and_nonces_is_safe(replicas):
    """After the TTL, outcomes and nonces are pruned, and an old proposal is refused as stale instead."""
    d = big_move()
    replicas(propose_command(d))
    replicas(approve_command(approval_of(d), now=T0 + 61))
    replicas(expire_command(T0 + 5000))
    assert replicas.a.outcome_of(d.decision_id) is None
    assert b"approval-01" not in replicas.a.snapshot()
    r = replicas(propose_command(d, now=T0 + 5001))
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "stale"


# --- removal of revoked members ---------------------------------------------------------------------------


def test_a_member_is_removed_only_by_an_operator_revocation(replicas):
    revocation = sign_revocation(OPERATOR, "node-3", reason="stolen from the berlin site", now=T0 + 5)
    result = replicas(remove_member_command(revocation, now=T0 + 6))
    assert result.outcome is Outcome.APPLIED and kinds(result) == ["member_removed"]
    event = result.audit[0].payload
    assert (event["node_id"], event["key_id"], event["reason"]) == ("node-3", OPERATOR.key_id,
                                                                    "stolen from the berlin site")
    assert replicas.a.history()[-1].outcome == "member_removed"
    # A node key (a captured device's own) or a forged signature cannot take a member out: refused, audited.
    by_node = sign_revocation(NODE, "node-2", reason="mine now", now=T0 + 7)
    forged = Revocation(**{**revocation.__dict__, "node_id": "node-2"})
    for bad in (by_node, forged):
        refused = replicas(remove_member_command(bad, now=T0 + 8))
        assert refused.outcome is Outcome.REFUSED and kinds(refused) == ["refused"]
        assert refused.audit[0].payload["reason"] == "unsigned_revocation"
    again = decode_command(remove_member_command(revocation, now=T0 + 6))
    assert again == RemoveMemberCommand(T0 + 6, revocation)


def test_a_removal_is_on_the_record_once_and_only_for_a_member():
    """A leader that retries after a failover adds no second record; a hostile member proposing the
    removal of a node that is not in the group, or with a revocation of one serial, is refused."""
    a = DecisionLedger(group="site-a", policy=POLICY, group_size=3, trusted=TRUSTED,
                       members=frozenset({"node-1", "node-2", "node-3"}))
    before = a.snapshot()
    revocation = sign_revocation(OPERATOR, "node-3", reason="stolen", now=T0 + 5)
    assert a.apply(remove_member_command(revocation, now=T0 + 6)).outcome is Outcome.APPLIED
    again = a.apply(remove_member_command(revocation, now=T0 + 7))
    assert again.outcome is Outcome.NOOP and again.audit == ()
    assert a.removed_members() == {"node-3": revocation.signature}
    stranger = sign_revocation(OPERATOR, "node-9", reason="elsewhere", now=T0 + 5)
    for other, reason in ((stranger, "not_a_member"),
                          (sign_revocation(OPERATOR, "node-2", reason="old key", now=T0 + 5, serial="ab12"),
                           "serial_revocation")):
        refused = a.apply(remove_member_command(other, now=T0 + 8))
        assert refused.outcome is Outcome.REFUSED and refused.audit[0].payload["reason"] == reason
    # The removed set is replicated state: in the snapshot, restored, and absent until used.
    assert b'"removed"' not in before
    b = DecisionLedger(group="site-a", policy=POLICY, group_size=3, trusted=TRUSTED)
    b.restore(a.snapshot())
    assert b.removed_members() == a.removed_members() and b.state_digest() == a.state_digest()


def test_a_malformed_removal_is_refused_not_raised(replicas):
    doc = json.loads(remove_member_command(
        sign_revocation(OPERATOR, "node-3", reason="stolen", now=T0 + 5), now=T0 + 6))
    for broken in ({**doc, "revocation": "node-3"},
                   {**doc, "revocation": {**doc["revocation"], "reason": ""}}):
        result = replicas(canonical_json(broken))
        assert result.outcome is Outcome.REFUSED and "remove_member" in result.message


# --- commands -------------------------------------------------------------------------------------------


def test_command_bytes_round_trip():
    d = big_move()
    a = approval_of(d)
    for cmd in (ProposeCommand(T0, d), ApproveCommand(T0 + 1, a)):
        assert decode_command(encode_command(cmd)) == cmd
    doc = json.loads(propose_command(d))
    assert doc["format"] == 1 and doc["cmd"] == "propose" and doc["now"] == d.proposed_at
    assert propose_command(d) == canonical_json(doc)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[]", "expected a JSON object"),
        (b'{"format":2,"cmd":"expire","now":1}', "unsupported format 2"),
        (b'{"format":"1","cmd":"expire","now":1}', "unsupported format"),
        (b'{"format":1,"cmd":"reboot","now":1}', "unknown command 'reboot'"),
        (b'{"format":1,"cmd":"expire"}', "missing field"),
        (b'{"format":1,"cmd":"expire","now":1,"x":2}', "unknown field"),
        (b'{"format":1,"cmd":"expire","now":NaN}', "not valid JSON"),
        (b'{"format":1,"cmd":"expire","now":-1}', "command.now"),
        (b'{"format":1,"cmd":"expire","now":1,"now":2}', "duplicate key"),
        (b'{"format":1,"cmd":"propose","now":1,"decision":{}}', "decision: missing"),
        (b'{"format":1,"cmd":"approve","now":1,"approval":[]}', "approval: expected an object"),
        (b'{"format":1,"cmd":"set_routes","now":1,"routes":{"cam 1":"n"},"allocations":{}}', "stream id"),
        (b'{"format":1,"cmd":"set_routes","now":1,"routes":{},"allocations":{"n":-1}}', "allocation"),
        (b"[" * 100_000, "not valid JSON"),
        (b" " * (1024 * 1024 + 1), "at most"),
    ],
)
def test_bad_commands_are_typed_errors_and_refused_by_apply(data, needle):
    with pytest.raises(CommandError, match=needle):
        decode_command(data)
    r = ledger().apply(data)
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "malformed_command"


def test_approve_and_deny_commands_must_match_the_signed_flag():
    d = big_move()
    with pytest.raises(CommandError, match="deny_command"):
        approve_command(approval_of(d, approve=False), now=T0)
    with pytest.raises(CommandError, match="approve_command"):
        deny_command(approval_of(d), now=T0)
    doc = json.loads(approve_command(approval_of(d), now=T0))
    doc["cmd"] = "deny"
    with pytest.raises(CommandError, match="approve=true"):
        decode_command(canonical_json(doc))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_never_crashes_on_bytes(data):
    with contextlib.suppress(CommandError):
        decode_command(data)


_json = json_values(max_size=3, text_size=16, key_size=10, max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_never_crashes_on_mutated_commands(data):
    base = data.draw(
        st.sampled_from(
            [
                propose_command(big_move()),
                approve_command(approval_of(big_move()), now=T0),
                expire_command(T0),
                initial_routes(),
            ]
        )
    )
    doc = json.loads(base)
    key = data.draw(st.sampled_from(sorted(doc)))
    inner = doc[key]
    if isinstance(inner, dict) and inner and data.draw(st.booleans()):
        inner[data.draw(st.sampled_from(sorted(inner)))] = data.draw(_json)
    else:
        doc[key] = data.draw(_json)
    try:
        raw = json.dumps(doc).encode()
    except (TypeError, ValueError):
        return
    with contextlib.suppress(CommandError):
        decode_command(raw)
    ledger().apply(raw)  # never raises


# --- replicas and snapshots -------------------------------------------------------------------------------


def test_snapshot_restore_is_exact(replicas):
    replicas(propose_command(big_move()))
    replicas(propose_command(small_move(at=T0 + 20)))
    snap = replicas.a.snapshot()
    c = ledger()
    c.restore(snap)
    assert c.snapshot() == snap and c.state_digest() == replicas.a.state_digest()
    assert c.pending() == replicas.a.pending() and c.history() == replicas.a.history()
    # A restored replica keeps agreeing with the others.
    cmd = approve_command(approval_of(big_move()), now=T0 + 61)
    assert c.apply(cmd) == replicas(cmd)
    assert c.state_digest() == replicas.a.state_digest()


@pytest.mark.parametrize(
    "damage",
    [
        lambda doc: doc.update(format=9),
        lambda doc: doc.update(group="site-b"),
        lambda doc: doc.update(clock="late"),
        lambda doc: doc["routes"].update({"cam 0": "node-1"}),
        lambda doc: doc["pending"][0]["decision"].update(kind="nope"),
        lambda doc: doc.pop("history"),
    ],
)
def test_restore_refuses_a_damaged_snapshot_and_keeps_state(replicas, damage):
    replicas(propose_command(big_move()))
    doc = json.loads(replicas.a.snapshot())
    damage(doc)
    c = ledger()
    c.apply(initial_routes())
    before = c.state_digest()
    with pytest.raises(SnapshotError):
        c.restore(json.dumps(doc).encode())
    assert c.state_digest() == before


def test_restore_refuses_garbage():
    with pytest.raises(SnapshotError):
        ledger().restore(b"\x00garbage")


class _HostileStream:
    """A plausible, hostile command stream built against the current routing table: proposals of every size
    and kind (returns of streams no reassignment took among them), approvals and denials by every key,
    withdrawals, reused nonces, lagging stamps, duplicate deliveries, garbage."""

    KEYS = (OPERATOR, OPERATOR, NODE, PUBLISHER)

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.now = T0
        self.decisions = []
        self.sent = [initial_routes()]

    def next(self, i: int, routes: dict[str, str], displaced: dict | None = None) -> bytes:
        rng = self.rng
        self.now += rng.choice([0, 1, 5, 30, 200])
        stamp = self.now - rng.choice([0, 0, 0, 50])  # some submitters lag behind
        roll = rng.random()
        if roll < 0.4 or not self.decisions:
            streams = rng.sample(sorted(routes), rng.randint(1, 5))
            kind_roll = rng.random()
            if kind_roll < 0.3:  # a dead node's streams
                dead = routes[streams[0]]
                streams = [s for s in streams if routes[s] == dead]
                kind = DecisionKind.REASSIGN_STREAMS
            else:
                kind = DecisionKind.RETURN_STREAMS if kind_roll < 0.45 else DecisionKind.MOVE_STREAMS
            targets = rng.sample(NODES, 1 if kind is DecisionKind.RETURN_STREAMS else rng.randint(1, 3))
            if kind is DecisionKind.RETURN_STREAMS and displaced and rng.random() < 0.7:
                # A plausible return: streams a reassignment took from one node, back to it.
                home = rng.choice(sorted({d.home for d in displaced.values()}))
                streams, targets = sorted(s for s, d in displaced.items() if d.home == home), [home]
            elif kind is DecisionKind.RETURN_STREAMS:  # one destination: leave out what it already serves
                streams = [s for s in streams if routes[s] != targets[0]] or streams[:1]
                targets = targets if routes[streams[0]] != targets[0] else ["node-9"]
            moves = [
                (s, routes[s], rng.choice([t for t in targets if t != routes[s]] or ["node-9"]))
                for s in streams
            ]
            d = make_decision(
                *moves, kind=kind, proposed_at=stamp, nonce=f"nonce-{i:05d}", proposer=rng.choice(NODES)
            )
            self.decisions.append(d)
            command = propose_command(d, now=stamp)
        elif roll < 0.75:
            d = rng.choice(self.decisions[-6:])
            nonce = rng.choice([f"appr-{i:05d}", "appr-reused"])
            approve = rng.random() < 0.8
            a = sign_approval(
                rng.choice(self.KEYS), d, now=stamp, ttl_s=rng.choice([10, 300]), nonce=nonce, approve=approve
            )
            command = (approve_command if approve else deny_command)(a, now=stamp)
        elif roll < 0.8:
            command = expire_command(stamp)
        elif roll < 0.85:
            d = rng.choice(self.decisions[-6:])
            command = withdraw_command(d.decision_id, reason="its premise is gone", now=stamp)
        elif roll < 0.95:
            command = rng.choice(self.sent)  # a duplicate delivery
        else:
            command = rng.randbytes(rng.randint(0, 40))
        self.sent.append(command)
        return command


@pytest.mark.parametrize("seed", range(8))
def test_replicas_agree_and_nothing_above_scope_is_applied_without_an_operator(seed):
    stream = _HostileStream(random.Random(seed))
    a, b, c = ledger(), ledger(), ledger()
    for replica in (a, b, c):
        replica.apply(initial_routes())
    outcomes = set()
    steps = 200
    for i in range(steps):
        command = stream.next(i, a.routes(), a.displaced())
        ra, rb = a.apply(command), b.apply(command)
        assert ra == rb, f"seed {seed}: replicas diverge at command {i}"
        if i == steps // 2:
            c.restore(a.snapshot())
        elif i > steps // 2:
            assert c.apply(command) == ra, f"seed {seed}: restored replica diverges at command {i}"
        outcomes.add(ra.outcome)
        for event in ra.audit:
            if event.kind != "applied":
                continue
            if event.payload["approved_by"] is None:
                proposal = decode_command(command)
                assert isinstance(proposal, ProposeCommand), f"seed {seed}: applied without a proposal at {i}"
                assert decide(proposal.decision, POLICY, len(NODES)).allowed, f"seed {seed}: bypass at {i}"
            else:
                assert event.payload["approved_by"] == OPERATOR.key_id, f"seed {seed}: non-operator approval"
    assert a.state_digest() == b.state_digest() == c.state_digest(), f"seed {seed}"
    assert {Outcome.APPLIED, Outcome.HELD, Outcome.REFUSED} <= outcomes, f"seed {seed}: stream too tame"
