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


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_site_only_pool_admits_its_own_site_even_when_seeded_across_sites(seed) -> None:
    """Sites mode: six nodes of two sites all join through a node of `amsterdam`. Each site's
    table ends with that site only; the updates about the other site are dropped and counted.
    The same cluster without `site_only` is one flat pool (the filter is what separates them)."""
    from mesh.membership.config import MembershipConfig
    from mesh.sim.netsim import Network

    def cluster(site_only: bool) -> Network:
        config = MembershipConfig(probe_interval_s=1.0, probe_timeout_s=0.5, push_pull_interval_s=5.0,
                                  site_only=site_only)
        net = Network(seed=seed, config=config)
        for i in range(6):
            net.add_node(f"n{i}", labels=(("site", SITES[i % 2]),))
        for i in range(1, 6):
            net.join(f"n{i}", ["n0"])
        net.run_for(15.0)
        return net

    net = cluster(site_only=True)
    for name, node in net.nodes.items():
        mine = SITES[int(name[1]) % 2]
        seen = {m.node_id for m in node.core.members() if m.state is State.ALIVE}
        if mine == "amsterdam":
            assert seen == {"n0", "n2", "n4"}, (name, seen)
        else:  # the berlin nodes joined through amsterdam's n0, which told them of nobody they admit
            assert seen <= {"n1", "n3", "n5"} and name in seen, (name, seen)
    assert net.nodes["n0"].core.stats.foreign_dropped > 0

    flat = cluster(site_only=False)
    assert all(node.core.live_count() == 6 for node in flat.nodes.values())


@settings(max_examples=200, deadline=None)
@given(reps=st.sets(st.text("abcdef0123", min_size=1, max_size=4), min_size=1, max_size=5),
       version=st.text("0123456789.", min_size=1, max_size=6), shuffle_seed=st.integers(0, 1000))
def test_the_fetcher_is_one_of_the_representatives_whatever_their_order(reps, version, shuffle_seed) -> None:
    from mesh.membership.federation import fetcher

    order = sorted(reps)
    random.Random(shuffle_seed).shuffle(order)
    chosen = fetcher(order, "hand", version)
    assert chosen in reps
    assert chosen == fetcher(sorted(reps), "hand", version)
    # Losing another representative does not move the role (rendezvous hashing).
    others = reps - {chosen}
    if others:
        assert fetcher(reps - {sorted(others)[0]}, "hand", version) == chosen


def test_versions_spread_over_the_representatives() -> None:
    from mesh.membership.federation import fetcher

    reps = ["node-01", "node-04", "node-07"]
    counts = {r: 0 for r in reps}
    for i in range(300):
        counts[fetcher(reps, "hand", f"1.{i}")] += 1
    assert all(60 < c < 140 for c in counts.values()), counts
    assert fetcher([], "hand", "1.0") is None


def test_a_member_that_moves_to_another_site_leaves_the_old_site_pool() -> None:
    """A node restarted with another `site` label: its old site's pool marks it LEFT (and says so),
    instead of keeping it ALIVE with its old labels because it still answers pings."""
    from mesh.membership.config import MembershipConfig
    from mesh.membership.core import Membership
    from mesh.membership.messages import EventKind, Gossip, Update

    config = MembershipConfig(site_only=True)
    core = Membership("a1", "a1:1", (("site", "amsterdam"),), config, random.Random(1), 0.0)
    core.on_gossip(Gossip("a2", (Update("a2", "a2:1", 0, State.ALIVE, (("site", "amsterdam"),)),)), 1.0)
    assert core.member("a2").state is State.ALIVE
    core.drain_events()
    moved = Update("a2", "a2:1", 1, State.ALIVE, (("site", "berlin"),))
    core.on_gossip(Gossip("a2", (moved,)), 2.0)
    assert core.member("a2").state is State.LEFT
    assert [e.kind for e in core.drain_events()] == [EventKind.LEFT]
    core.on_gossip(Gossip("a2", (moved,)), 3.0)  # said again: nothing more happens
    assert core.drain_events() == [] and core.member("a2").state is State.LEFT


def test_a_stale_entry_with_other_labels_does_not_evict_a_member() -> None:
    """A node that still carries an old label relays an old entry about a member (a rolling site
    rename): an entry older than the one held is not a move, and the member stays."""
    from mesh.membership.config import MembershipConfig
    from mesh.membership.core import Membership
    from mesh.membership.messages import Gossip, Update

    config = MembershipConfig(site_only=True)
    core = Membership("a1", "a1:1", (("site", "amsterdam"),), config, random.Random(1), 0.0)
    core.on_gossip(Gossip("a2", (Update("a2", "a2:1", 3, State.ALIVE, (("site", "amsterdam"),)),)), 1.0)
    core.on_gossip(Gossip("a3", (Update("a2", "a2:1", 2, State.ALIVE, (("site", "ams"),)),)), 2.0)
    assert core.member("a2").state is State.ALIVE and core.member("a2").incarnation == 3


def test_with_tenure_the_longest_serving_keep_the_role_not_the_lowest_ids() -> None:
    """A low-id representative wrongly declared dead was replaced; when it comes back, both say they
    represent the site. The replacement, serving longer now, keeps the role (by ids alone the
    returning node would evict it, and the role would flap on every false death)."""
    view = [member("a"), member("b"), member("c"), member("d")]
    advertised = ["a", "b", "d"]  # a came back; d replaced it meanwhile
    assert choose_representatives(view, "amsterdam", advertised, k=2) == ("a", "b")  # ids alone
    tenure = {"b": 100, "d": 200, "a": 300}
    assert choose_representatives(view, "amsterdam", advertised, k=2, tenure=tenure) == ("b", "d")


preferred_st = st.sets(st.text("abcdef0123", min_size=1, max_size=4), max_size=8)


@settings(max_examples=300, deadline=None)
@given(view=members_st, k=ks, current=st.lists(st.text("abcdef0123", min_size=1, max_size=4), max_size=6),
       preferred=preferred_st, shuffle_seed=st.integers(0, 1000))
def test_preferred_candidates_come_first_and_a_preferred_representative_is_never_displaced(
        view, k, current, preferred, shuffle_seed) -> None:
    """Preferred members (in the node: those that run the site's rollouts) fill the places first; a
    preferred representative keeps its place; the choice stays deterministic and of the right size."""
    chosen = choose_representatives(view, "amsterdam", current, k, preferred=preferred)
    shuffled = list(view)
    random.Random(shuffle_seed).shuffle(shuffled)
    assert chosen == choose_representatives(shuffled, "amsterdam", list(reversed(current)), k,
                                            preferred=sorted(preferred, reverse=True))
    candidates = live_in(view, "amsterdam")
    assert len(chosen) == min(k, len(candidates))
    liked = candidates & preferred
    assert len(set(chosen) & liked) == min(k, len(liked))  # as many preferred as there are places for
    kept = [c for c in current if c in liked]
    if len(set(kept)) <= k:
        assert set(kept) <= set(chosen)  # a preferred representative is never displaced
    # Stable: asked again with its own choice as the current one, nothing moves.
    assert choose_representatives(view, "amsterdam", chosen, k, preferred=preferred) == chosen


@settings(max_examples=300, deadline=None)
@given(view=members_st, k=ks, current=st.lists(st.text("abcdef0123", min_size=1, max_size=4), max_size=6))
def test_without_preferences_the_choice_is_what_it_was(view, k, current) -> None:
    """`preferred` empty, or preferring every member, changes nothing."""
    plain = choose_representatives(view, "amsterdam", current, k)
    assert choose_representatives(view, "amsterdam", current, k, preferred=()) == plain
    everyone = {m.node_id for m in view}
    assert choose_representatives(view, "amsterdam", current, k, preferred=everyone) == plain


def test_a_preferred_newcomer_takes_the_place_of_a_representative_that_is_not_preferred() -> None:
    view = [member("a"), member("b"), member("c"), member("z")]
    assert choose_representatives(view, "amsterdam", ["a", "b"], k=2, preferred={"z"}) == ("a", "z")
    assert choose_representatives(view, "amsterdam", ["a", "z"], k=2, preferred={"z"}) == ("a", "z")
    # a suspected preferred member is still preferred to an alive one that is not
    view = [member("a"), member("y", state=State.SUSPECT)]
    assert choose_representatives(view, "amsterdam", (), k=1, preferred={"y"}) == ("y",)


@settings(max_examples=400, deadline=None)
@given(view=members_st, k=ks, data=st.data())
def test_preferences_drawn_from_the_site_one_not_preferred_yields_only_to_one_preferred(
        view, k, data) -> None:
    """`current` and `preferred` drawn from the site's own members (so the rule is exercised): the choice
    keeps every preferred representative it has room for, fills with preferred newcomers before keeping
    representatives that are not preferred, and keeps those before taking other newcomers."""
    ids = sorted({m.node_id for m in view})
    if not ids:
        return
    current = data.draw(st.lists(st.sampled_from(ids), max_size=6, unique=True))
    preferred = data.draw(st.sets(st.sampled_from(ids)))
    tenure = {c: data.draw(st.integers(0, 3)) for c in current}
    chosen = set(choose_representatives(view, "amsterdam", current, k, tenure=tenure, preferred=preferred))
    candidates = live_in(view, "amsterdam")
    liked, serving = candidates & preferred, candidates & set(current)
    places = min(k, len(candidates))
    assert len(chosen) == places
    assert len(chosen & liked) == min(k, len(liked))  # preferred first
    if len(liked) < k:  # room left: serving ones that are not preferred come before other newcomers
        assert len(chosen & (serving - liked)) == min(k - len(liked), len(serving - liked))
    again = choose_representatives(view, "amsterdam", sorted(chosen), k, tenure=tenure, preferred=preferred)
    assert again == tuple(sorted(chosen))
