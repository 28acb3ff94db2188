"""The pure fault plans: who hears whom under each partition, and the nft script that says so."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chaos.faults import (
    FaultPlanError,
    bridge,
    components,
    cut,
    halves,
    hears,
    isolate,
    majorities_ring,
    minority_with,
    one_way,
    render_ruleset,
)
from chaos.proxy import parse_ports

seeds = st.integers(min_value=0, max_value=2**32)


def _nodes(n: int) -> list[str]:
    return [f"n{i:02d}" for i in range(1, n + 1)]


@given(n=st.integers(min_value=4, max_value=15), seed=seeds)
def test_majorities_ring_every_node_hears_a_different_majority(n, seed):
    nodes = _nodes(n)
    heard = hears(majorities_ring(nodes, random.Random(seed)), nodes)
    views = {frozenset(others | {node}) for node, others in heard.items()}
    assert all(len(others) + 1 > n // 2 for others in heard.values())
    assert all(len(others) + 1 < n for others in heard.values())
    assert len(views) == n
    assert all((a in heard[b]) == (b in heard[a]) for a in nodes for b in nodes if a != b)


@given(n=st.integers(min_value=2, max_value=15), seed=seeds)
def test_halves_split_everyone_into_two_sides_that_hear_only_themselves(n, seed):
    nodes = _nodes(n)
    grudges, (small, large) = halves(nodes, random.Random(seed))
    assert sorted(small + large) == nodes and len(small) <= len(large) and small
    heard = hears(grudges, nodes)
    for side in (small, large):
        for node in side:
            assert heard[node] == set(side) - {node}


@given(n=st.integers(min_value=3, max_value=9), seed=seeds, data=st.data())
def test_minority_with_puts_the_named_node_on_the_small_side(n, seed, data):
    nodes = _nodes(n)
    keep = data.draw(st.sampled_from(nodes))
    size = (n - 1) // 2
    grudges, (minority, majority) = minority_with(nodes, keep, size, random.Random(seed))
    assert keep in minority and len(minority) == size and len(majority) == n - size
    assert grudges == cut(minority, majority)


def test_minority_with_refuses_what_is_not_a_split():
    with pytest.raises(FaultPlanError, match="not a split"):
        minority_with(_nodes(5), "n01", 5, random.Random(1))
    with pytest.raises(FaultPlanError, match="not among"):
        minority_with(_nodes(5), "n09", 2, random.Random(1))


@given(n=st.integers(min_value=3, max_value=12), seed=seeds)
def test_bridge_node_hears_both_halves_that_do_not_hear_each_other(n, seed):
    nodes = _nodes(n)
    grudges, shape = bridge(nodes, random.Random(seed))
    heard = hears(grudges, nodes)
    assert heard[shape["bridge"]] == set(nodes) - {shape["bridge"]}
    for node in shape["left"]:
        assert not heard[node] & set(shape["right"])


def test_isolate_components_and_one_way():
    nodes = _nodes(4)
    assert hears(isolate("n02", nodes), nodes)["n02"] == set()
    assert hears(components([["n01", "n02"], ["n03"], ["n04"]]), nodes)["n01"] == {"n02"}
    asymmetric = hears(one_way(["n01"], nodes), nodes)
    assert asymmetric["n01"] == set() and "n01" in asymmetric["n02"]


def test_the_same_seed_plans_the_same_cut():
    nodes = _nodes(9)
    assert halves(nodes, random.Random(42)) == halves(nodes, random.Random(42))
    assert majorities_ring(nodes, random.Random(42)) == majorities_ring(nodes, random.Random(42))


def test_ruleset_drops_each_pair_and_adds_loss_once():
    addresses = {"n01": "10.0.0.10", "n02": "10.0.0.11", "n03": "10.0.0.12"}
    script = render_ruleset(addresses, {("n01", "n02")}, {("n01", "n02"): 30, ("n02", "n03"): 25})
    assert "flush table bridge fmc" in script
    assert "ip saddr 10.0.0.10 ip daddr 10.0.0.11 drop" in script
    assert "ip saddr 10.0.0.11 ip daddr 10.0.0.12 numgen random mod 100 < 25 drop" in script
    assert "10.0.0.10 ip daddr 10.0.0.11 numgen" not in script  # already dropped outright


def test_ruleset_refuses_unknown_nodes_and_impossible_loss():
    with pytest.raises(FaultPlanError, match="no address for 'n09'"):
        render_ruleset({"n01": "10.0.0.10"}, {("n01", "n09")}, {})
    with pytest.raises(FaultPlanError, match="above 100%"):
        render_ruleset({"n01": "10.0.0.10", "n02": "10.0.0.11"}, (), {("n01", "n02"): 130})


@given(st.lists(st.tuples(st.integers(1, 65535), st.integers(1, 65535)), min_size=1, max_size=5))
def test_proxy_ports_parse_back(pairs):
    assert parse_ports(",".join(f"{a}:{b}" for a, b in pairs)) == pairs


@given(st.text(max_size=30))
def test_proxy_ports_parser_raises_only_value_error(text):
    with contextlib.suppress(ValueError):
        parse_ports(text)


def test_rotated_matrix_shows_every_nemesis_family_two_seeds_at_the_cost_of_about_one():
    from chaos.scenarios import MATRIX, SCENARIOS, families, rotated_plan

    scenarios = [SCENARIOS[n] for n in MATRIX]
    plan = rotated_plan(scenarios, [1, 2, 3])
    seen: dict[str, set[int]] = {}
    for scenario, seed in plan:
        for fam in families(scenario, seed):
            seen.setdefault(fam, set()).add(seed)
    assert {"partition", "kill", "pause", "clock", "packet", "corrupt", "disk"} <= set(seen)
    assert all(len(s) >= 2 for s in seen.values()), seen
    assert {s.name for s, _ in plan} == set(MATRIX)  # every scenario at least once
    names = [(s.name, seed) for s, seed in plan]
    assert len(set(names)) == len(names)  # no run twice
    assert len(plan) < 1.5 * len(scenarios)  # rotation, not the product
    assert names == [
        (s.name, seed) for s, seed in rotated_plan(scenarios, [1, 2, 3])
    ]  # the same arguments plan the same runs
    # one seed: the plain matrix
    assert [(s.name, seed) for s, seed in rotated_plan(scenarios, [7])] == [(n, 7) for n in MATRIX]


def test_a_nemesis_draws_the_same_whether_or_not_another_found_a_leader():
    """Replay: each nemesis draws from its own generator (seed and key), and a leader fault draws its
    fallback either way, so whether a leader answered changes no later nemesis's choice."""
    import asyncio
    from types import SimpleNamespace

    from chaos.nemesis import Partition
    from chaos.scenarios import Scenario, steps_for

    sites = {"a": ["n00", "n01", "n02"], "b": ["n03", "n04", "n05"]}
    plan = SimpleNamespace(ids=[n for m in sites.values() for n in m], site_names=sorted(sites),
                           site_members=lambda site: sites[site])

    class Book:
        async def set(self, key, **kwargs):
            pass

    async def applied(leader: str | None) -> list[dict]:
        async def lookup(site: str) -> str | None:
            return leader if leader in sites[site] else None

        world = SimpleNamespace(cluster=SimpleNamespace(plan=plan), book=Book(), leader=lookup,
                                mark_tampered=lambda node: None)
        scenario = Scenario("t", "test", plan=lambda: plan,
                            steps=lambda rng: [(0.0, 1.0, Partition("leader", site="a")),
                                               (2.0, 1.0, Partition("asymmetric"))])
        return [await nemesis.apply(world) for _, _, nemesis in steps_for(scenario, 5)]

    answered, unanswered = asyncio.run(applied("n01")), asyncio.run(applied(None))
    assert answered[0]["leader"] == "n01" and unanswered[0]["leader_known"] is False
    assert answered[1] == unanswered[1]
