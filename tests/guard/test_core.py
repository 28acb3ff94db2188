"""Decisions, policy and the guard's verdict: codec strictness, limits at their boundaries, config parsing."""

from __future__ import annotations

import copy
import json
import re
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.guard.core import (
    DEFAULT_LIMITS,
    Allocation,
    Decision,
    DecisionError,
    DecisionKind,
    Limits,
    Policy,
    PolicyError,
    StreamMove,
    VerdictOutcome,
    decide,
)
from tests.strategies import json_values


def make_decision(
    *moves: tuple[str, str, str],
    kind: DecisionKind = DecisionKind.MOVE_STREAMS,
    group: str = "site-a",
    proposer: str = "node-1",
    proposed_at: float = 1000.0,
    nonce: str = "nonce-0001",
    allocations: tuple[tuple[str, int], ...] = (),
    reason: str = "node-1 is overloaded",
) -> Decision:
    """A decision from plain tuples, so tests read like the scenario."""
    return Decision(
        kind=kind,
        group=group,
        proposer=proposer,
        reason=reason,
        proposed_at=proposed_at,
        nonce=nonce,
        moves=tuple(StreamMove(*m) for m in moves),
        allocations=tuple(Allocation(*a) for a in allocations),
    )


def test_round_trip_and_digest_is_canonical():
    d = make_decision(("cam-2", "node-1", "node-2"), ("cam-1", "node-1", "node-3"))
    again = Decision.from_dict(json.loads(json.dumps(d.to_dict())))
    assert again == d
    assert again.digest() == d.digest()
    assert len(d.digest()) == 64 and d.decision_id == d.digest()[:16]
    # Order of moves does not change what is approved.
    swapped = make_decision(("cam-1", "node-1", "node-3"), ("cam-2", "node-1", "node-2"))
    assert swapped.digest() == d.digest()
    assert d.affected_nodes == {"node-1", "node-2", "node-3"}
    assert d.streams == ("cam-1", "cam-2")


def test_nonce_and_every_field_change_the_digest():
    base = make_decision(("cam-1", "node-1", "node-2"))
    variants = [
        make_decision(("cam-1", "node-1", "node-2"), nonce="nonce-0002"),
        make_decision(("cam-1", "node-1", "node-3")),
        make_decision(("cam-1", "node-1", "node-2"), proposed_at=1001.0),
        make_decision(("cam-1", "node-1", "node-2"), reason="other"),
        make_decision(("cam-1", "node-1", "node-2"), group="site-b"),
        make_decision(("cam-1", "node-1", "node-2"), proposer="node-2"),
        make_decision(("cam-1", "node-1", "node-2"), kind=DecisionKind.REASSIGN_STREAMS),
    ]
    digests = {v.digest() for v in variants} | {base.digest()}
    assert len(digests) == len(variants) + 1


@pytest.mark.parametrize(
    ("mutate", "names"),
    [
        (lambda d: d.pop("nonce"), "nonce"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d.update(format=2), "format"),
        (lambda d: d.update(format=True), "format"),
        (lambda d: d.update(kind="reboot_fleet"), "kind"),
        (lambda d: d.update(group="bad group"), "group"),
        (lambda d: d.update(proposer=""), "proposer"),
        (lambda d: d.update(proposed_at="yesterday"), "proposed_at"),
        (lambda d: d.update(proposed_at=-1), "proposed_at"),
        (lambda d: d.update(proposed_at=10**400), "proposed_at"),
        (lambda d: d.update(proposed_at=float("inf")), "proposed_at"),
        (lambda d: d.update(nonce="short"), "nonce"),
        (lambda d: d.update(reason="x" * 513), "reason"),
        (lambda d: d.update(reason="\ud800"), "reason"),
        (lambda d: d.update(moves=[]), "at least one move"),
        (lambda d: d.update(moves="cam-1"), "moves"),
        (lambda d: d["moves"][0].update(to="node-1"), "to itself"),
        (lambda d: d["moves"][0].pop("from"), "moves[0]"),
        (lambda d: d["moves"][0].update(stream=7), "moves[0].stream"),
        (lambda d: d["moves"].append(dict(d["moves"][0])), "listed twice"),
        (lambda d: d.update(allocations=[{"node": "node-1", "slots": 2}]), "no allocations"),
        (
            lambda d: d.update(moves=[{"stream": f"s{i}", "from": "a", "to": "b"} for i in range(1025)]),
            "at most",
        ),
    ],
)
def test_from_dict_refuses_with_a_message_naming_the_problem(mutate, names):
    doc = copy.deepcopy(make_decision(("cam-1", "node-1", "node-2")).to_dict())
    mutate(doc)
    with pytest.raises(DecisionError, match=re.escape(names)):
        Decision.from_dict(doc)


def test_kind_rules():
    with pytest.raises(DecisionError, match="reassign_streams takes the streams of one dead node"):
        make_decision(("a", "n1", "n2"), ("b", "n3", "n2"), kind=DecisionKind.REASSIGN_STREAMS)
    with pytest.raises(DecisionError, match="set_allocation needs"):
        make_decision(kind=DecisionKind.SET_ALLOCATION)
    with pytest.raises(DecisionError, match="slots"):
        make_decision(kind=DecisionKind.SET_ALLOCATION, allocations=(("n1", -1),))
    with pytest.raises(DecisionError, match="listed twice"):
        make_decision(kind=DecisionKind.SET_ALLOCATION, allocations=(("n1", 1), ("n1", 2)))
    ok = make_decision(kind=DecisionKind.SET_ALLOCATION, allocations=(("n1", 4),))
    assert Decision.from_dict(ok.to_dict()) == ok
    with pytest.raises(DecisionError, match="return_streams gives streams back to one node"):
        make_decision(("a", "n2", "n1"), ("b", "n2", "n3"), kind=DecisionKind.RETURN_STREAMS)
    back = make_decision(("a", "n2", "n1"), ("b", "n3", "n1"), kind=DecisionKind.RETURN_STREAMS)
    assert Decision.from_dict(back.to_dict()) == back


def test_change_ignores_who_why_when_and_the_nonce_but_not_what():
    base = make_decision(("cam-2", "node-1", "node-2"), ("cam-1", "node-1", "node-3"))
    same = make_decision(("cam-1", "node-1", "node-3"), ("cam-2", "node-1", "node-2"), nonce="nonce-0002",
                         proposer="node-9", proposed_at=2000.0, reason="another reason")
    assert same.change == base.change and same.digest() != base.digest()
    for other in (
        make_decision(("cam-2", "node-1", "node-2")),
        make_decision(("cam-2", "node-1", "node-2"), ("cam-1", "node-1", "node-4")),
        make_decision(("cam-2", "node-1", "node-2"), ("cam-1", "node-1", "node-3"),
                      kind=DecisionKind.REASSIGN_STREAMS),
    ):
        assert other.change != base.change


def test_return_streams_has_default_limits_and_reads_its_own_table():
    assert DEFAULT_LIMITS[DecisionKind.RETURN_STREAMS] == DEFAULT_LIMITS[DecisionKind.REASSIGN_STREAMS]
    policy = Policy.from_mapping({"return_streams": {"max_streams": 0}})
    assert policy.limits_for(DecisionKind.RETURN_STREAMS).max_streams == 0
    assert Policy.from_mapping(policy.to_mapping()) == policy


_json = json_values()


@settings(max_examples=200, deadline=None)
@given(_json)
def test_from_dict_never_crashes_on_arbitrary_json(doc):
    try:
        d = Decision.from_dict(doc)
    except DecisionError:
        return
    assert Decision.from_dict(d.to_dict()) == d


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_from_dict_on_mutated_valid_documents(data):
    """Replace one field of a valid document with arbitrary JSON: a typed error or a valid decision."""
    doc = make_decision(("cam-1", "node-1", "node-2"), ("cam-2", "node-1", "node-3")).to_dict()
    key = data.draw(st.sampled_from(sorted(doc)))
    if key == "moves" and data.draw(st.booleans()):
        field = data.draw(st.sampled_from(["stream", "from", "to"]))
        doc["moves"][0][field] = data.draw(_json)
    else:
        doc[key] = data.draw(_json)
    try:
        d = Decision.from_dict(doc)
    except DecisionError as exc:
        assert str(exc).startswith("decision")
        return
    assert Decision.from_dict(d.to_dict()).digest() == d.digest()


# --- decide -------------------------------------------------------------------------------------------

POLICY = Policy(
    limits={
        DecisionKind.MOVE_STREAMS: Limits(max_nodes=2, max_fraction=0.5, max_streams=5),
        DecisionKind.REASSIGN_STREAMS: Limits(max_nodes=3, max_fraction=0.6, max_streams=5),
        DecisionKind.SET_ALLOCATION: Limits(max_nodes=1, max_fraction=0.25, max_streams=0),
    }
)


def _moves(n: int, src: str = "node-1", dst: str = "node-2") -> list[tuple[str, str, str]]:
    return [(f"cam-{i}", src, dst) for i in range(n)]


def test_within_scope_is_allowed_at_the_exact_limits():
    d = make_decision(*_moves(5))  # 5 streams, 2 nodes, 2/4 = 50%
    verdict = decide(d, POLICY, group_size=4)
    assert verdict.outcome is VerdictOutcome.ALLOW and verdict.allowed
    assert verdict.exceeded == ()
    assert (verdict.scope.nodes_affected, verdict.scope.streams_moved) == (2, 5)
    assert verdict.scope.fraction_of_group == 0.5


def test_too_many_streams_is_held_with_the_limit_named():
    d = make_decision(*_moves(7), kind=DecisionKind.REASSIGN_STREAMS)
    verdict = decide(d, POLICY, group_size=10)
    assert verdict.outcome is VerdictOutcome.HOLD
    assert verdict.exceeded == ("moves 7 streams, policy allows 5 for reassign_streams",)


def test_too_many_nodes_and_too_large_a_fraction():
    d = make_decision(("a", "node-1", "node-2"), ("b", "node-1", "node-3"))
    verdict = decide(d, POLICY, group_size=5)
    assert verdict.outcome is VerdictOutcome.HOLD
    assert verdict.exceeded == (
        "affects 3 nodes, policy allows 2 for move_streams",
        "affects 60% of the group (3 of 5 nodes), policy allows 50% for move_streams",
    )
    # The same decision in a bigger group only exceeds the node count.
    assert decide(d, POLICY, group_size=100).exceeded == (
        "affects 3 nodes, policy allows 2 for move_streams",
    )


def test_fraction_alone_holds_in_a_small_group():
    d = make_decision(("a", "node-1", "node-2"))
    assert decide(d, POLICY, group_size=4).allowed
    verdict = decide(d, POLICY, group_size=3)
    assert not verdict.allowed
    assert verdict.exceeded == (
        "affects 67% of the group (2 of 3 nodes), policy allows 50% for move_streams",
    )


def test_allocation_limits():
    one = make_decision(kind=DecisionKind.SET_ALLOCATION, allocations=(("node-1", 4),))
    two = make_decision(kind=DecisionKind.SET_ALLOCATION, allocations=(("node-1", 4), ("node-2", 0)))
    assert decide(one, POLICY, group_size=4).allowed
    assert decide(two, POLICY, group_size=8).exceeded == (
        "affects 2 nodes, policy allows 1 for set_allocation",
    )


def test_group_size_must_be_positive():
    with pytest.raises(DecisionError, match="group size"):
        decide(make_decision(("a", "n1", "n2")), POLICY, group_size=0)


@settings(max_examples=300, deadline=None)
@given(
    streams=st.integers(1, 12),
    targets=st.integers(1, 4),
    group_size=st.integers(1, 20),
    max_nodes=st.integers(0, 6),
    max_streams=st.integers(0, 12),
    max_fraction=st.sampled_from([0.0, 0.1, 0.25, 1 / 3, 0.5, 2 / 3, 1.0]),
)
def test_hold_exactly_when_a_limit_is_exceeded(
    streams, targets, group_size, max_nodes, max_streams, max_fraction
):
    d = make_decision(*[(f"cam-{i}", "node-0", f"node-{1 + i % targets}") for i in range(streams)])
    nodes = 1 + min(targets, streams)
    policy = Policy(limits={DecisionKind.MOVE_STREAMS: Limits(max_nodes, max_fraction, max_streams)})
    verdict = decide(d, policy, group_size)
    over = [streams > max_streams, nodes > max_nodes, nodes / group_size > max_fraction + 1e-9]
    assert verdict.allowed == (not any(over))
    assert len(verdict.exceeded) == sum(over)
    assert verdict.scope.nodes_affected == nodes


# --- policy ---------------------------------------------------------------------------------------------


def test_policy_defaults_and_toml_table():
    assert Policy.from_mapping(None) == Policy()
    assert (
        Policy.from_mapping({}).limits_for(DecisionKind.MOVE_STREAMS)
        == DEFAULT_LIMITS[DecisionKind.MOVE_STREAMS]
    )
    table = tomllib.loads(
        """
        [guard]
        hold_ttl_s = 600
        rollout_max_share = 0.05
        [guard.reassign_streams]
        max_streams = 12
        max_fraction = 1
        """
    )["guard"]
    policy = Policy.from_mapping(table)
    assert policy.hold_ttl_s == 600.0
    assert (policy.rollout_max_share, policy.rollout_max_share_ppm) == (0.05, 50_000)
    assert Policy().rollout_max_share_ppm is None  # the signed plan's scope alone
    assert Policy(rollout_max_share=0.29).rollout_max_share_ppm == 290_000  # nearest, not 289999
    reassign = policy.limits_for(DecisionKind.REASSIGN_STREAMS)
    assert (reassign.max_streams, reassign.max_fraction) == (12, 1.0)
    assert reassign.max_nodes == DEFAULT_LIMITS[DecisionKind.REASSIGN_STREAMS].max_nodes
    assert Policy.from_mapping(policy.to_mapping()) == policy


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"hold_ttl": 5}, "guard.hold_ttl"),
        ({"hold_ttl_s": 0}, "guard.hold_ttl_s"),
        ({"hold_ttl_s": True}, "guard.hold_ttl_s"),
        ({"hold_ttl_s": "1h"}, "guard.hold_ttl_s"),
        ({"move_streams": 3}, "guard.move_streams"),
        ({"move_streams": {"max_node": 3}}, "guard.move_streams.max_node"),
        ({"move_streams": {"max_nodes": -1}}, "guard.move_streams.max_nodes"),
        ({"move_streams": {"max_nodes": 2.5}}, "guard.move_streams.max_nodes"),
        ({"set_allocation": {"max_streams": "many"}}, "guard.set_allocation.max_streams"),
        ({"reassign_streams": {"max_fraction": 1.5}}, "guard.reassign_streams.max_fraction"),
        ({"reassign_streams": {"max_fraction": False}}, "guard.reassign_streams.max_fraction"),
        ({"rollout_max_share": 5}, "guard.rollout_max_share"),
        ({"rollout_max_share": "5%"}, "guard.rollout_max_share"),
        ({"rollout_max_share": True}, "guard.rollout_max_share"),
    ],
)
def test_policy_errors_name_the_field(table, field):
    with pytest.raises(PolicyError) as info:
        Policy.from_mapping(table)
    assert str(info.value).startswith(field + ":")


def test_policy_table_must_be_a_mapping():
    with pytest.raises(PolicyError, match="guard: expected a table"):
        Policy.from_mapping([1, 2])  # type: ignore[arg-type]
