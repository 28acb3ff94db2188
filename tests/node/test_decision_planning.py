"""The pure parts of a node's own proposals: when it counts as overloaded, and which
streams it offers to whom."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh.guard.core import StreamMove
from mesh.node.streams import OverloadWatch, plan_offload


def test_offload_moves_half_to_the_least_loaded_nodes():
    routes = {"a1": "a", "a2": "a", "a3": "a", "a4": "a", "b1": "b", "b2": "b", "c1": "c"}
    moves = plan_offload(routes, "a", ["a", "b", "c"])
    assert moves == [StreamMove("a1", "a", "c"), StreamMove("a2", "a", "b")]


def test_nothing_to_offload_with_one_stream_or_no_other_node():
    assert plan_offload({"a1": "a"}, "a", ["a", "b"]) == []
    assert plan_offload({"a1": "a", "a2": "a"}, "a", ["a"]) == []


@given(st.dictionaries(st.sampled_from([f"s{i}" for i in range(20)]), st.sampled_from("abcd"), max_size=20),
       st.lists(st.sampled_from("abcd"), min_size=1, unique=True))
def test_offload_only_moves_the_overloaded_nodes_streams_to_live_nodes(routes, live):
    moves = plan_offload(routes, "a", live)
    assert all(routes[m.stream] == "a" and m.from_node == "a" and m.to_node in live and m.to_node != "a"
               for m in moves)
    assert len({m.stream for m in moves}) == len(moves)
    mine = sum(1 for owner in routes.values() if owner == "a")
    assert len(moves) <= max(1, mine // 2)


def test_overload_fires_after_a_sustained_queue_then_stays_quiet():
    watch = OverloadWatch(workers=2, queue_per_worker=2.0, sustained=3, cooldown=4)
    assert [watch.sample(p) for p in (5, 5, 1, 4, 4)] == [False] * 5  # a dip resets the streak
    assert watch.sample(4) is True  # third sample in a row at or above 4
    assert [watch.sample(9) for _ in range(4)] == [False] * 4  # cooldown
    assert [watch.sample(9) for _ in range(3)] == [False, False, True]
