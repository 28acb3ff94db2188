"""Representative choice for the federation pool (pure), with hypothesis."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.membership.federation import choose_representatives, site_of
from mesh.membership.messages import MemberView, State

SITES = ["amsterdam", "berlin"]


def member(node_id: str, site: str | None = "amsterdam", state: State = State.ALIVE) -> MemberView:
    labels = (("device_class", "camera"), ("site", site)) if site else (("device_class", "camera"),)
    return MemberView(node_id, f"{node_id}:1", labels, state, 0, 0.0, None)


members_st = st.dictionaries(
    keys=st.text("abcdef0123", min_size=1, max_size=4),
    values=st.tuples(st.sampled_from([*SITES, None]), st.sampled_from(State)),
    max_size=25,
).map(lambda d: [member(node_id, site, state) for node_id, (site, state) in d.items()])
ks = st.integers(0, 5)


def live_in(view: list[MemberView], site: str) -> set[str]:
    return {m.node_id for m in view if site_of(m.labels) == site and m.state in (State.ALIVE, State.SUSPECT)}


@settings(max_examples=300, deadline=None)
@given(view=members_st, k=ks, current=st.lists(st.text("abcdef0123", min_size=1, max_size=4), max_size=6),
       shuffle_seed=st.integers(0, 1000))
def test_the_choice_is_deterministic_and_of_the_right_size(view, k, current, shuffle_seed) -> None:
    chosen = choose_representatives(view, "amsterdam", current, k)
    shuffled = list(view)
    random.Random(shuffle_seed).shuffle(shuffled)
    assert chosen == choose_representatives(shuffled, "amsterdam", list(reversed(current)), k)
    candidates = live_in(view, "amsterdam")
    assert len(chosen) == min(k, len(candidates))
    assert set(chosen) <= candidates and list(chosen) == sorted(set(chosen))


@settings(max_examples=300, deadline=None)
@given(view=members_st, k=ks, newcomers=st.lists(st.text("0", min_size=1, max_size=3), max_size=4))
def test_live_representatives_keep_the_role_when_better_ids_join(view, k, newcomers) -> None:
    chosen = choose_representatives(view, "amsterdam", (), k)
    # Newcomers with ids that sort first ("0", "00", ...) join the site.
    grown = view + [member(f"{n}-new") for n in dict.fromkeys(newcomers)]
    again = choose_representatives(grown, "amsterdam", chosen, k)
    assert set(chosen) <= set(again)
    if len(chosen) == k:
        assert again == chosen


@settings(max_examples=300, deadline=None)
@given(view=members_st, k=st.integers(1, 5), which=st.integers(0, 10), dead_state=st.sampled_from([State.DEAD,
                                                                                                       State.LEFT]))
def test_a_dead_representative_is_replaced_by_exactly_one_new(view, k, which, dead_state) -> None:
    chosen = choose_representatives(view, "amsterdam", (), k)
    if not chosen:
        return
    gone = chosen[which % len(chosen)]
    after = [member(m.node_id, site_of(m.labels), dead_state) if m.node_id == gone else m for m in view]
    again = choose_representatives(after, "amsterdam", chosen, k)
    assert gone not in again
    assert set(chosen) - {gone} <= set(again)
    spare = live_in(after, "amsterdam") - set(chosen)
    assert len(set(again) - set(chosen)) == (1 if spare else 0)


def test_alive_members_are_preferred_and_sites_do_not_mix() -> None:
    view = [member("a", state=State.SUSPECT), member("b"), member("c"), member("d", "berlin"),
            member("e", None),
            member("f", state=State.DEAD)]
    assert choose_representatives(view, "amsterdam", k=2) == ("b", "c")
    assert choose_representatives(view, "amsterdam", k=3) == ("a", "b", "c")
    assert choose_representatives(view, "berlin") == ("d",)
    # A suspected representative is not replaced on suspicion alone.
    assert choose_representatives(view, "amsterdam", ["a"], k=2) == ("a", "b")
    with pytest.raises(ValueError, match="k must be"):
        choose_representatives(view, "amsterdam", k=-1)
