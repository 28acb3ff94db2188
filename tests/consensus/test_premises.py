"""Decisions whose premise is gone: withdrawn holds, decisions held once, streams given back to a node
that returns (the ledger's rules, and the pure planners the leader uses)."""

from __future__ import annotations

import contextlib
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.consensus.commands import (
    CommandError,
    WithdrawCommand,
    approve_command,
    decode_command,
    deny_command,
    encode_command,
    expire_command,
    propose_command,
    set_routes_command,
    withdraw_command,
)
from mesh.consensus.ledger import DecisionLedger, Displacement, Outcome
from mesh.consensus.premises import ReturnSchedule, plan_return, returnable, stale_holds
from mesh.guard.core import DecisionKind, Limits, Policy
from tests.consensus.test_state import NODES, T0, TRUSTED, approval_of, kinds
from tests.guard.test_core import make_decision

# A dead node's two streams go to two survivors: 3 of 5 nodes, 2 streams. Within scope here...
WIDE = Policy(
    limits={
        DecisionKind.REASSIGN_STREAMS: Limits(max_nodes=3, max_fraction=0.6, max_streams=4),
        DecisionKind.RETURN_STREAMS: Limits(max_nodes=3, max_fraction=0.6, max_streams=4),
    },
    hold_ttl_s=600.0,
)
# ... and above it here: every reassignment and every return waits for an operator.
NARROW = Policy(
    limits={
        DecisionKind.REASSIGN_STREAMS: Limits(max_nodes=3, max_fraction=0.6, max_streams=1),
        DecisionKind.RETURN_STREAMS: Limits(max_nodes=3, max_fraction=0.6, max_streams=1),
    },
    hold_ttl_s=600.0,
)
ROUTES = {f"cam-{i}": NODES[i // 2] for i in range(10)}  # cam-4, cam-5 on node-3


class Replicas:
    """Two replicas of one policy fed the same commands; calling it returns the first one's result and
    checks that both agree, in their result and their whole state."""

    def __init__(self, policy: Policy) -> None:
        self.a, self.b = (
            DecisionLedger(group="site-a", policy=policy, group_size=len(NODES), trusted=TRUSTED)
            for _ in range(2)
        )
        self(set_routes_command(ROUTES, now=T0))

    def __call__(self, command: bytes):
        ra, rb = self.a.apply(command), self.b.apply(command)
        assert ra == rb
        assert self.a.state_digest() == self.b.state_digest()
        return ra


def reassign_node_3(nonce: str = "reassign-01", at: float = T0 + 10, proposer: str = "node-4"):
    return make_decision(("cam-4", "node-3", "node-1"), ("cam-5", "node-3", "node-2"),
                         kind=DecisionKind.REASSIGN_STREAMS, proposed_at=at, nonce=nonce, proposer=proposer,
                         reason="node-3 was marked dead by membership")


def return_to_node_3(nonce: str = "return-0001", at: float = T0 + 100):
    return make_decision(("cam-4", "node-1", "node-3"), ("cam-5", "node-2", "node-3"),
                         kind=DecisionKind.RETURN_STREAMS, proposed_at=at, nonce=nonce, proposer="node-4",
                         reason="node-3 is back")


# --- withdrawal -------------------------------------------------------------------------------------------


def test_a_held_reassignment_is_withdrawn_audited_and_a_late_approval_refused_saying_so():
    replicas = Replicas(NARROW)
    d = reassign_node_3()
    assert replicas(propose_command(d)).outcome is Outcome.HELD
    r = replicas(withdraw_command(d.decision_id, reason="node-3 is alive again", now=T0 + 30))
    assert r.outcome is Outcome.WITHDRAWN and kinds(r) == ["withdrawn"]
    assert r.audit[0].payload == {"decision_id": d.decision_id, "kind": "reassign_streams",
                                  "reason": "node-3 is alive again", "held_at": T0 + 10, "at": T0 + 30}
    a = replicas.a
    assert a.pending() == () and a.outcome_of(d.decision_id) == "withdrawn"
    assert a.history()[-1].outcome == "withdrawn" and "node-3 is alive again" in a.history()[-1].detail
    assert a.routes()["cam-4"] == "node-3"  # nothing moved

    r = replicas(approve_command(approval_of(d), now=T0 + 61))
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "withdrawn"
    assert f"decision {d.decision_id}, which was withdrawn (node-3 is alive again)" in r.message
    assert a.routes()["cam-4"] == "node-3"
    # Proposing it again is a noop (it is finished); withdrawing again too.
    assert replicas(propose_command(d, now=T0 + 62)).outcome is Outcome.NOOP
    again = replicas(withdraw_command(d.decision_id, reason="still alive", now=T0 + 63))
    assert again.outcome is Outcome.NOOP and "already withdrawn" in again.message


def test_withdrawing_what_is_not_held_changes_nothing():
    replicas = Replicas(WIDE)
    applied = reassign_node_3()
    assert replicas(propose_command(applied)).outcome is Outcome.APPLIED
    before = replicas.a.routes()
    r = replicas(withdraw_command(applied.decision_id, reason="node-3 is alive again", now=T0 + 30))
    assert r.outcome is Outcome.NOOP and "already applied" in r.message
    r = replicas(withdraw_command("0123456789abcdef", reason="gone", now=T0 + 31))
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "not_pending"
    assert replicas.a.routes() == before


def test_withdrawn_outcomes_survive_a_snapshot_and_are_forgotten_like_others():
    replicas = Replicas(NARROW)
    d = reassign_node_3()
    replicas(propose_command(d))
    replicas(withdraw_command(d.decision_id, reason="node-3 is alive again", now=T0 + 30))
    c = DecisionLedger(group="site-a", policy=NARROW, group_size=len(NODES), trusted=TRUSTED)
    c.restore(replicas.a.snapshot())
    assert c.state_digest() == replicas.a.state_digest()
    late = approve_command(approval_of(d), now=T0 + 61)
    assert c.apply(late) == replicas(late)
    replicas(expire_command(T0 + 5000))
    assert replicas.a.outcome_of(d.decision_id) is None


# --- one hold per decision --------------------------------------------------------------------------------


def test_the_same_reassignment_proposed_twice_is_held_once_and_the_duplicate_audited():
    replicas = Replicas(NARROW)
    first = reassign_node_3("reassign-01", at=T0 + 10)
    second = reassign_node_3("reassign-02", at=T0 + 10.004, proposer="node-5")  # ms later, another nonce
    assert first.decision_id != second.decision_id and first.change == second.change
    assert replicas(propose_command(first)).outcome is Outcome.HELD
    r = replicas(propose_command(second))
    assert r.outcome is Outcome.NOOP and kinds(r) == ["duplicate"]
    assert r.audit[0].payload["held_as"] == first.decision_id
    assert f"answer {first.decision_id}" in r.message
    assert [h.decision_id for h in replicas.a.pending()] == [first.decision_id]
    # Once the first is answered, the same change may be held again (it is a new question then).
    replicas(withdraw_command(first.decision_id, reason="node-3 is alive again", now=T0 + 20))
    assert replicas(propose_command(second, now=T0 + 21)).outcome is Outcome.HELD


def test_a_different_change_is_not_a_duplicate():
    replicas = Replicas(NARROW)
    assert replicas(propose_command(reassign_node_3())).outcome is Outcome.HELD
    other = make_decision(("cam-4", "node-3", "node-2"), ("cam-5", "node-3", "node-1"),
                          kind=DecisionKind.REASSIGN_STREAMS, proposed_at=T0 + 11, nonce="reassign-03")
    assert replicas(propose_command(other)).outcome is Outcome.HELD
    assert len(replicas.a.pending()) == 2


_STREAMS = [f"cam-{i}" for i in range(10)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sets(st.sampled_from(_STREAMS), min_size=1, max_size=3),
                          st.sampled_from(NODES), st.booleans()), min_size=1, max_size=25),
       st.randoms(use_true_random=False))
def test_no_two_held_decisions_ever_make_the_same_change(proposals, rng):
    """Whatever is proposed, by whom, with whatever nonces (including the same change over and
    over), the held decisions' changes are distinct, and every replica agrees."""
    replicas = Replicas(Policy(limits={DecisionKind.MOVE_STREAMS: Limits(0, 0.0, 0)}, hold_ttl_s=600.0))
    for i, (streams, target, repeat) in enumerate(proposals):
        routes = replicas.a.routes()
        moves = [(s, routes[s], target) for s in sorted(streams) if routes[s] != target]
        if not moves:
            continue
        for copy in range(2 if repeat else 1):
            d = make_decision(*moves, proposed_at=T0 + i, nonce=f"nonce-{i:03d}-{copy}-{rng.randrange(99)}")
            replicas(propose_command(d))
        changes = [h.decision.change for h in replicas.a.pending()]
        assert len(changes) == len(set(changes))


# --- displacements and returns -----------------------------------------------------------------------------


def test_a_reassignment_records_what_it_took_and_a_return_gives_exactly_that_back():
    replicas = Replicas(WIDE)
    d = reassign_node_3()
    assert replicas(propose_command(d)).outcome is Outcome.APPLIED
    assert replicas.a.displaced() == {
        "cam-4": Displacement("node-3", "node-1", d.decision_id, T0 + 10),
        "cam-5": Displacement("node-3", "node-2", d.decision_id, T0 + 10),
    }
    back = return_to_node_3()
    r = replicas(propose_command(back))
    assert r.outcome is Outcome.APPLIED, r.message
    assert kinds(r) == ["proposed", "applied"] and r.audit[1].payload["kind"] == "return_streams"
    assert replicas.a.routes() == ROUTES and replicas.a.displaced() == {}
    # Nothing more to give back: the same return again no longer fits the table.
    r = replicas(propose_command(return_to_node_3("return-0002", at=T0 + 101)))
    assert r.outcome is Outcome.REFUSED and r.audit[0].payload["reason"] == "state_changed"


def test_a_return_may_only_give_back_what_a_reassignment_took():
    replicas = Replicas(WIDE)
    # cam-0 is node-1's own stream: a "return" of it to node-3 is refused, whatever the scope.
    grab = make_decision(("cam-0", "node-1", "node-3"), kind=DecisionKind.RETURN_STREAMS, proposed_at=T0 + 5,
                         nonce="grab-000001")
    r = replicas(propose_command(grab))
    assert r.outcome is Outcome.REFUSED and "cam-0 was not taken from node-3 by a reassignment" in r.message
    replicas(propose_command(reassign_node_3()))
    # node-3's streams may not be "returned" to node-5 either.
    wrong_home = make_decision(("cam-4", "node-1", "node-5"), kind=DecisionKind.RETURN_STREAMS,
                               proposed_at=T0 + 20, nonce="grab-000002")
    assert replicas(propose_command(wrong_home)).outcome is Outcome.REFUSED
    assert replicas.a.routes()["cam-4"] == "node-1"


def test_a_stream_moved_on_purpose_since_is_no_longer_returnable():
    replicas = Replicas(Policy(limits={**WIDE.limits, DecisionKind.MOVE_STREAMS: Limits(2, 1.0, 5)},
                               hold_ttl_s=600.0))
    replicas(propose_command(reassign_node_3()))
    moved = make_decision(("cam-4", "node-1", "node-5"), proposed_at=T0 + 20, nonce="moved-00001")
    assert replicas(propose_command(moved)).outcome is Outcome.APPLIED
    assert set(replicas.a.displaced()) == {"cam-5"}
    assert returnable(replicas.a.routes(), replicas.a.displaced(), "node-3") == ["cam-5"]


def test_a_stream_reassigned_twice_still_belongs_to_its_first_node():
    replicas = Replicas(WIDE)
    replicas(propose_command(reassign_node_3()))
    # node-1, which took cam-4, dies too: its streams (its own and cam-4) go elsewhere.
    node_1_dead = make_decision(("cam-0", "node-1", "node-4"), ("cam-1", "node-1", "node-5"),
                                ("cam-4", "node-1", "node-2"), kind=DecisionKind.REASSIGN_STREAMS,
                                proposed_at=T0 + 20, nonce="reassign-02")
    assert replicas(propose_command(node_1_dead)).outcome is Outcome.HELD  # 4 nodes: above scope
    replicas(approve_command(approval_of(node_1_dead), now=T0 + 21))
    displaced = replicas.a.displaced()
    assert displaced["cam-4"].home == "node-3" and displaced["cam-4"].holder == "node-2"
    assert displaced["cam-0"].home == "node-1"
    # node-3 comes back and gets both its streams, from wherever they are now.
    plan = plan_return(replicas.a.routes(), displaced, "node-3", group="site-a", proposer="node-4",
                       alive_for_s=30.0, now=T0 + 100, rng=random.Random(1))
    assert plan is not None and {(m.stream, m.from_node) for m in plan.moves} == {("cam-4", "node-2"),
                                                                                   ("cam-5", "node-2")}
    assert replicas(propose_command(plan)).outcome is Outcome.APPLIED
    assert replicas.a.routes()["cam-4"] == "node-3" and replicas.a.routes()["cam-5"] == "node-3"


def test_a_return_above_scope_waits_for_an_operator_like_any_decision():
    replicas = Replicas(NARROW)
    d = reassign_node_3()
    replicas(propose_command(d))
    replicas(approve_command(approval_of(d), now=T0 + 20))
    back = return_to_node_3()
    assert replicas(propose_command(back)).outcome is Outcome.HELD
    assert replicas.a.routes()["cam-4"] == "node-1"
    r = replicas(approve_command(approval_of(back, nonce="approval-02"), now=T0 + 101))
    assert r.outcome is Outcome.APPLIED and replicas.a.routes() == ROUTES


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["reassign", "move", "return"]), st.sampled_from(NODES),
                          st.sampled_from(NODES)), min_size=1, max_size=30))
def test_displacements_always_describe_the_table_and_returns_only_give_back(steps):
    """Any sequence of reassignments, moves and returns: every displacement names a stream still
    where a reassignment put it and a home other than that; a return only moves a stream to the
    node a reassignment took it from."""
    everything = Limits(max_nodes=5, max_fraction=1.0, max_streams=10)
    replicas = Replicas(Policy(limits={kind: everything for kind in DecisionKind}, hold_ttl_s=600.0))
    for i, (what, a, b) in enumerate(steps):
        routes, displaced = replicas.a.routes(), replicas.a.displaced()
        if what == "return":
            d = plan_return(routes, displaced, a, group="site-a", proposer=b, alive_for_s=60.0, now=T0 + i,
                            rng=random.Random(i))
        else:
            mine = sorted(s for s, n in routes.items() if n == a)
            if not mine or a == b:
                continue
            kind = DecisionKind.REASSIGN_STREAMS if what == "reassign" else DecisionKind.MOVE_STREAMS
            d = make_decision(*((s, a, b) for s in mine), kind=kind, proposed_at=T0 + i,
                              nonce=f"nonce-{i:04d}")
        if d is None:
            continue
        before = dict(displaced)
        r = replicas(propose_command(d))
        assert r.outcome is Outcome.APPLIED, r.message
        if d.kind is DecisionKind.RETURN_STREAMS:
            assert all(before[m.stream].home == m.to_node for m in d.moves)
        routes = replicas.a.routes()
        for stream, taken in replicas.a.displaced().items():
            assert routes[stream] == taken.holder and taken.home != taken.holder


def test_snapshots_of_format_1_still_restore():
    replicas = Replicas(NARROW)
    d = reassign_node_3()
    replicas(propose_command(d))
    doc = json.loads(replicas.a.snapshot())
    assert doc["format"] == 2
    doc["format"] = 1
    del doc["displaced"]
    for finished in doc["finished"].values():
        del finished["detail"]
    c = DecisionLedger(group="site-a", policy=NARROW, group_size=len(NODES), trusted=TRUSTED)
    c.restore(json.dumps(doc).encode())
    assert c.pending() == replicas.a.pending() and c.displaced() == {}


# --- the withdraw command's bytes ---------------------------------------------------------------------------


def test_withdraw_command_round_trips_and_refuses_what_it_cannot_name():
    cmd = WithdrawCommand(T0, "0123456789abcdef", "node-3 is alive again")
    assert decode_command(encode_command(cmd)) == cmd
    with pytest.raises(CommandError, match="decision_id"):
        withdraw_command("not-an-id", reason="x", now=T0)
    with pytest.raises(CommandError, match="reason"):
        withdraw_command("0123456789abcdef", reason=" ", now=T0)
    with pytest.raises(CommandError, match="reason"):
        withdraw_command("0123456789abcdef", reason="x" * 513, now=T0)


@settings(max_examples=300, deadline=None)
@given(decision_id=st.one_of(st.text(max_size=20), st.integers(), st.none()),
       reason=st.one_of(st.text(max_size=600), st.integers(), st.none(), st.lists(st.text())))
def test_withdraw_fields_from_the_network_are_a_command_or_a_typed_error(decision_id, reason):
    raw = json.dumps({"format": 1, "cmd": "withdraw", "now": T0, "decision_id": decision_id,
                      "reason": reason}).encode()
    with contextlib.suppress(CommandError):
        assert decode_command(raw) == WithdrawCommand(T0, decision_id, reason)
    r = Replicas(NARROW)(raw)  # never raises; a malformed one is refused on every replica
    assert r.outcome in (Outcome.REFUSED, Outcome.NOOP)


# --- the pure planners ------------------------------------------------------------------------------------


def test_stale_holds_name_reassignments_of_live_nodes_and_returns_to_dead_ones():
    replicas = Replicas(NARROW)
    reassign = reassign_node_3()
    replicas(propose_command(reassign))
    other = make_decision(("cam-6", "node-4", "node-1"), kind=DecisionKind.REASSIGN_STREAMS,
                          proposed_at=T0 + 11, nonce="reassign-04", reason="node-4 was marked dead")
    replicas(propose_command(other))
    pending = replicas.a.pending()
    assert stale_holds(pending, alive={"node-1", "node-2"}, gone={"node-3", "node-4"}) == []
    (w,) = stale_holds(pending, alive={"node-1", "node-3"}, gone={"node-4"})
    assert w.decision_id == reassign.decision_id
    assert w.reason == "node-3 is alive again; its streams stay with it"

    replicas(withdraw_command(reassign.decision_id, reason=w.reason, now=T0 + 12))
    replicas(deny_command(approval_of(other, approve=False), now=T0 + 13))
    replicas(propose_command(reassign_node_3("reassign-05", at=T0 + 14)))
    replicas(approve_command(approval_of(replicas.a.pending()[0].decision, nonce="approval-02"), now=T0 + 15))
    back = return_to_node_3()
    assert replicas(propose_command(back)).outcome is Outcome.HELD
    (w,) = stale_holds(replicas.a.pending(), alive={"node-1"}, gone={"node-3"})
    assert w.decision_id == back.decision_id and "node-3 is down again" in w.reason
    assert stale_holds(replicas.a.pending(), alive={"node-3"}, gone=set()) == []


def test_plan_return_is_deterministic_under_a_seed_and_none_when_nothing_is_owed():
    displaced = {"cam-4": Displacement("node-3", "node-1", "0" * 16, T0),
                 "cam-5": Displacement("node-3", "node-2", "0" * 16, T0)}
    routes = {**ROUTES, "cam-4": "node-1", "cam-5": "node-2"}
    plans = [plan_return(routes, displaced, "node-3", group="site-a", proposer="node-4", alive_for_s=31.0,
                         now=T0, rng=random.Random(7)) for _ in range(2)]
    assert plans[0] is not None and plans[0] == plans[1] and plans[0].kind is DecisionKind.RETURN_STREAMS
    assert "node-3 is back (alive for 31s)" in plans[0].reason
    assert plan_return(routes, displaced, "node-5", group="site-a", proposer="node-4", alive_for_s=31.0,
                       now=T0, rng=random.Random(7)) is None


def test_return_schedule_waits_for_the_settle_period_and_starts_over_after_a_flap():
    displaced = {"cam-4": Displacement("node-3", "node-1", "0" * 16, T0)}
    routes = {**ROUTES, "cam-4": "node-1"}
    schedule = ReturnSchedule(settle_s=30.0)
    assert schedule.due(routes, displaced, T0) == ([], None)  # node-3 is not alive (not seen yet)
    schedule.up("node-3", T0 + 100, restart=True)
    assert schedule.due(routes, displaced, T0 + 110) == ([], T0 + 130)
    schedule.down("node-3")  # suspected again
    schedule.up("node-3", T0 + 120, restart=True)
    assert schedule.due(routes, displaced, T0 + 140) == ([], T0 + 150)
    assert schedule.due(routes, displaced, T0 + 150) == (["node-3"], None)
    # A stream moved on since is owed to nobody.
    assert schedule.due({**routes, "cam-4": "node-5"}, displaced, T0 + 150) == ([], None)
    schedule.observe(alive={"node-1"}, now=T0 + 151)  # node-3 missing from the live set: its period ends
    assert schedule.alive_for_s("node-3", T0 + 151) is None
    assert schedule.alive_for_s("node-1", T0 + 152) == 1.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["up", "restart", "down", "observe"]), st.sampled_from(NODES[:3]),
                          st.floats(0, 50)), max_size=30), st.floats(0, 60))
def test_return_schedule_never_declares_due_a_node_that_has_not_stayed_up(events, settle_s):
    displaced = {f"cam-{i}": Displacement(NODES[i], "node-5", "0" * 16, T0) for i in range(3)}
    routes = {s: "node-5" for s in displaced}
    schedule = ReturnSchedule(settle_s)
    now, up_since = T0, {}
    for what, node, dt in events:
        now += dt
        if what == "up":
            schedule.up(node, now)
            up_since.setdefault(node, now)
        elif what == "restart":
            schedule.up(node, now, restart=True)
            up_since[node] = now
        elif what == "down":
            schedule.down(node)
            up_since.pop(node, None)
        else:
            schedule.observe({node}, now)
            up_since = {node: up_since.get(node, now)}
        due, next_at = schedule.due(routes, displaced, now)
        for home in due:
            assert home in up_since and now >= up_since[home] + settle_s
        assert next_at is None or next_at > now
