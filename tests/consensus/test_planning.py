"""The pure planners of a site's own proposals: where a dead node's streams go, what an overloaded
node hands off, and when it counts as overloaded. Properties under hypothesis (it prints the failing
example, seed included)."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.consensus.commands import propose_command, set_routes_command
from mesh.consensus.ledger import DecisionLedger, Outcome
from mesh.consensus.planning import OverloadWatch, new_nonce, plan_offload, plan_reassignment
from mesh.guard.core import MAX_MOVES, Decision, DecisionKind, Limits, Policy, StreamMove
from mesh.identity.signing import TrustedKeys

NODES = [f"node-{i}" for i in range(6)]
STREAMS = [f"cam-{i}" for i in range(30)]
GROUP = "site-a"
NOW = 1_700_000_000.0

routes_st = st.dictionaries(st.sampled_from(STREAMS), st.sampled_from(NODES), max_size=len(STREAMS))
live_st = st.lists(st.sampled_from(NODES), unique=True)
seeds = st.integers(0, 2**64 - 1)
nows = st.floats(0, 4e9, allow_nan=False)


def reassign(
    routes: dict[str, str], dead: str, live: list[str], seed: int, now: float = NOW
) -> Decision | None:
    rng = random.Random(seed)
    return plan_reassignment(routes, dead, live, group=GROUP, proposer="node-0", now=now, rng=rng)


def offload(routes: dict[str, str], overloaded: str, live: list[str], seed: int = 0) -> Decision | None:
    return plan_offload(
        routes, overloaded, live, group=GROUP, reason="queue long", now=NOW, rng=random.Random(seed)
    )


def after(routes: dict[str, str], moves: tuple[StreamMove, ...]) -> dict[str, str]:
    return {**routes, **{m.stream: m.to_node for m in moves}}


def balanced_within_one_stream(
    routes: dict[str, str], moves: tuple[StreamMove, ...], targets: set[str]
) -> bool:
    """No node the plan fed ends more than one stream above the least-loaded target."""
    load = Counter(after(routes, moves).values())
    least = min(load[n] for n in targets)
    return all(load[m.to_node] <= least + 1 for m in moves)


# --- reassigning a dead node's streams ----------------------------------------------------------


@given(routes=routes_st, dead=st.sampled_from(NODES), live=live_st, seed=seeds, now=nows)
def test_every_stream_of_the_dead_node_goes_to_a_live_node_of_the_site(routes, dead, live, seed, now):
    decision = reassign(routes, dead, live, seed, now)
    streams = sorted(s for s, owner in routes.items() if owner == dead)
    targets = set(live) - {dead}
    if not streams or not targets:
        assert decision is None
        return
    assert decision is not None
    assert decision.kind is DecisionKind.REASSIGN_STREAMS
    assert (decision.group, decision.proposer, decision.proposed_at) == (GROUP, "node-0", float(now))
    assert sorted(decision.streams) == streams
    assert all(m.from_node == dead and m.to_node in targets for m in decision.moves)
    assert balanced_within_one_stream(routes, decision.moves, targets)


@given(routes=routes_st, dead=st.sampled_from(NODES), live=live_st, seed=seeds, other=seeds)
def test_a_plan_is_determined_by_its_inputs_and_seed(routes, dead, live, seed, other):
    first = reassign(routes, dead, live, seed)
    assert first == reassign(routes, dead, live, seed)
    if first is not None:
        assert first.digest() == reassign(routes, dead, live, seed).digest()
        if other != seed:
            again = reassign(routes, dead, live, other)
            assert again is not None and again.nonce != first.nonce and again.moves == first.moves


@given(routes=routes_st, dead=st.sampled_from(NODES), seed=seeds)
def test_nothing_is_planned_without_a_live_target(routes, dead, seed):
    assert reassign(routes, dead, [], seed) is None
    assert reassign(routes, dead, [dead], seed) is None
    assert reassign({s: n for s, n in routes.items() if n != dead}, dead, NODES, seed) is None


def test_streams_go_to_the_least_loaded_first_ties_by_node_id():
    routes = {"cam-1": "node-x", "cam-2": "node-x", "cam-3": "node-x", "cam-4": "node-a", "cam-5": "node-a"}
    decision = reassign(routes, "node-x", ["node-a", "node-b", "node-c"], seed=1)
    assert decision is not None
    assert decision.moves == (
        StreamMove("cam-1", "node-x", "node-b"),
        StreamMove("cam-2", "node-x", "node-c"),
        StreamMove("cam-3", "node-x", "node-b"),
    )
    assert decision.reason == "node-x was marked dead by membership"


def test_one_decision_carries_at_most_max_moves():
    routes = {f"cam-{i}": "node-x" for i in range(MAX_MOVES + 10)}
    decision = reassign(routes, "node-x", ["node-a"], seed=1)
    assert decision is not None and len(decision.moves) == MAX_MOVES
    assert Decision.from_dict(decision.to_dict()) == decision  # what every replica will parse


@settings(max_examples=60, deadline=None)
@given(routes=routes_st, dead=st.sampled_from(NODES), live=live_st, seed=seeds)
def test_the_ledger_applies_a_plan_and_the_dead_node_serves_nothing(routes, dead, live, seed):
    decision = reassign(routes, dead, live, seed)
    if decision is None:
        return
    everything = Limits(max_nodes=len(NODES), max_fraction=1.0, max_streams=len(STREAMS))
    ledger = DecisionLedger(
        group=GROUP,
        policy=Policy(limits={DecisionKind.REASSIGN_STREAMS: everything}, hold_ttl_s=600.0),
        group_size=len(NODES),
        trusted=TrustedKeys([]),
    )
    ledger.apply(set_routes_command(routes, now=NOW))
    result = ledger.apply(propose_command(decision))
    assert result.outcome is Outcome.APPLIED, result.message
    assert dead not in ledger.routes().values()


def test_nonces_come_from_the_random_source():
    assert new_nonce(random.Random(7)) == new_nonce(random.Random(7))
    assert len(new_nonce(random.Random(7))) == 16
    assert new_nonce(random.Random(7)) != new_nonce(random.Random(8))


# --- offloading an overloaded node --------------------------------------------------------------


def test_offload_moves_half_to_the_least_loaded_nodes():
    routes = {"a1": "a", "a2": "a", "a3": "a", "a4": "a", "b1": "b", "b2": "b", "c1": "c"}
    decision = offload(routes, "a", ["a", "b", "c"])
    assert decision is not None
    assert list(decision.moves) == [StreamMove("a1", "a", "c"), StreamMove("a2", "a", "b")]
    assert decision.kind is DecisionKind.MOVE_STREAMS
    assert (decision.proposer, decision.reason) == ("a", "queue long")


def test_nothing_to_offload_with_one_stream_or_no_other_node():
    assert offload({"a1": "a"}, "a", ["a", "b"]) is None
    assert offload({"a1": "a", "a2": "a"}, "a", ["a"]) is None


@given(st.dictionaries(st.sampled_from([f"s{i}" for i in range(20)]), st.sampled_from("abcd"), max_size=20),
       st.lists(st.sampled_from("abcd"), min_size=1, unique=True))
def test_offload_only_moves_the_overloaded_nodes_streams_to_live_nodes(routes, live):
    decision = offload(routes, "a", live)
    moves = decision.moves if decision is not None else ()
    assert all(routes[m.stream] == "a" and m.from_node == "a" and m.to_node in live and m.to_node != "a"
               for m in moves)
    assert len({m.stream for m in moves}) == len(moves)
    mine = sum(1 for owner in routes.values() if owner == "a")
    assert len(moves) <= max(1, mine // 2)
    if moves:
        assert balanced_within_one_stream(routes, moves, set(live) - {"a"})


@given(routes=routes_st, live=live_st, seed=seeds)
def test_offload_is_determined_by_its_inputs_and_seed(routes, live, seed):
    assert offload(routes, "node-1", live, seed) == offload(routes, "node-1", live, seed)


# --- when a node is overloaded ------------------------------------------------------------------


def test_overload_fires_after_a_sustained_queue_then_stays_quiet():
    watch = OverloadWatch(workers=2, queue_per_worker=2.0, sustained=3, cooldown=4)
    assert [watch.sample(p) for p in (5, 5, 1, 4, 4)] == [False] * 5  # a dip resets the streak
    assert watch.sample(4) is True  # third sample in a row at or above 4
    assert [watch.sample(9) for _ in range(4)] == [False] * 4  # cooldown
    assert [watch.sample(9) for _ in range(3)] == [False, False, True]


def test_overload_reason_names_the_threshold_and_how_long():
    watch = OverloadWatch(workers=4, sustained=3)
    assert watch.reason("node-1", 5.0) == "node-1 is overloaded (inference queue >= 8 for 15s)"
