"""The SWIM core, alone (precedence, piggyback budget, hypothesis) and in
clusters on the in-memory network of `netsim` (join, loss, crash, partition,
leave). Every randomised test takes a seed and names it when it fails."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.membership.config import MembershipConfig
from mesh.membership.core import Membership, overrides, push_pull_interval_s
from mesh.membership.messages import (
    Ack,
    EventKind,
    Gossip,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Send,
    State,
    UnknownMember,
    Update,
    WrongTarget,
)
from mesh.sim.netsim import Network

# memberlist's LAN timings, except a 10 s push-pull so partitions heal quickly.
CONFIG = MembershipConfig(probe_interval_s=1.0, probe_timeout_s=0.5, gossip_interval_s=0.2,
                          push_pull_interval_s=10.0, gossip_to_dead_s=10.0)
SEEDS = [1, 2, 3]

ALIVE, SUSPECT, DEAD, LEFT = State.ALIVE, State.SUSPECT, State.DEAD, State.LEFT


def joined_cluster(n: int, seed: int, **network_options) -> Network:
    """n nodes that joined through n00 and see each other ALIVE."""
    net = Network(n, seed=seed, config=CONFIG, **network_options)
    net.join_all()
    took = net.run_until(net.all_alive, timeout_s=30)
    assert took is not None, f"seed {seed}: {n} nodes did not converge; disagreements: {net.disagreements()}"
    return net


def ids(first: int, last: int) -> list[str]:
    return [f"n{i:02d}" for i in range(first, last)]


# -- clusters on the simulated network -----------------------------------------


def test_ten_nodes_joining_one_seed_converge() -> None:
    """Gossip usually spreads a join storm in a few rounds; push-pull is the
    guarantee for the unlucky pair that missed a rumour."""
    n, join_spread_s = 10, 0.5
    bound_s = join_spread_s + push_pull_interval_s(CONFIG, n)
    took_s = []
    for seed in range(1, 21):
        net = Network(n, seed=seed, config=CONFIG)
        net.join_all(spread_s=join_spread_s)
        took = net.run_until(net.all_alive, timeout_s=bound_s)
        assert took is not None, \
            f"seed {seed}: not converged after {bound_s} s; disagreements: {net.disagreements()}"
        assert not net.events(EventKind.SUSPECT), f"seed {seed}: suspicion during a loss-free join"
        assert len(net.events(EventKind.JOINED)) == n * (n - 1)
        took_s.append(took)
    assert statistics.median(took_s) <= join_spread_s + CONFIG.dissemination_s(n), sorted(took_s)


def test_join_is_retried_while_the_seed_is_unreachable() -> None:
    seed = 11
    net = Network(2, seed=seed, config=CONFIG)
    net.partition(["n00"], ["n01"])
    net.join("n01", ["n00"])
    net.run_for(5)
    net.heal()
    took = net.run_until(net.all_alive, timeout_s=CONFIG.push_pull_interval_s + 1)
    assert took is not None, \
        f"seed {seed}: the lost join was not retried; disagreements: {net.disagreements()}"


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_ten_percent_loss_never_kills_a_live_node(seed: int) -> None:
    net = joined_cluster(20, seed)
    net.loss = 0.10
    net.run_for(600)
    dead = net.events(EventKind.DEAD)
    assert not dead, f"seed {seed}: live nodes declared dead: {dead[:5]}"
    suspicions = net.events(EventKind.SUSPECT)
    assert suspicions, f"seed {seed}: 10% loss for 10 minutes and not one suspicion: the test proves nothing"
    assert any(view.incarnation > 0 for view in net.nodes["n00"].core.members()), \
        f"seed {seed}: suspicions were never refuted"
    net.loss = 0.0
    assert net.run_until(net.all_alive, timeout_s=CONFIG.suspicion_timeout_s(20)) is not None, \
        f"seed {seed}: suspicions linger after the loss stopped; disagreements: {net.disagreements()}"


def test_crashed_node_is_declared_dead_within_the_bound() -> None:
    n = 10
    detection_s = []
    for seed in range(1, 8):
        net = joined_cluster(n, seed)
        net.run_for(5)
        crashed_at = net.now
        net.crash("n03")
        bound_s = CONFIG.detection_bound_s(n)
        took = net.run_until(lambda net=net: net.all_see("n03", DEAD), timeout_s=bound_s, check_every_s=0.01)
        assert took is not None, f"seed {seed}: n03 not dead everywhere {bound_s} s after its crash"
        last_dead_at = max(e.at for e in net.events(EventKind.DEAD, about="n03"))
        detection_s.append(last_dead_at - crashed_at)
        assert not net.events(EventKind.DEAD, about="n00"), f"seed {seed}: a survivor was declared dead"
    expected_s = CONFIG.expected_detection_s(n)
    median_s = statistics.median(detection_s)
    assert expected_s / 2 <= median_s <= expected_s * 2, \
        f"median detection {median_s:.2f} s (all: {sorted(detection_s)}) is far from the expected " \
        f"{expected_s:.2f} s"


@pytest.mark.parametrize("seed", SEEDS)
def test_briefly_unreachable_node_refutes_and_is_never_dead(seed: int) -> None:
    """n04 is unreachable until the first suspicion, then back: well inside the
    suspicion timeout, which starts at that suspicion."""
    n = 10
    net = joined_cluster(n, seed)
    net.isolate("n04")
    went_away = net.now
    took = net.run_until(lambda: bool(net.events(EventKind.SUSPECT, about="n04")), timeout_s=30,
                         check_every_s=0.01)
    assert took is not None, f"seed {seed}: nobody suspected the unreachable n04"
    net.heal()
    net.run_for(30)
    assert not net.events(EventKind.DEAD), f"seed {seed}: {net.events(EventKind.DEAD)[:3]}"
    assert net.nodes["n04"].core.incarnation > 0, f"seed {seed}: n04 never refuted"
    assert all(view["n04"] == (ALIVE, net.nodes["n04"].core.incarnation) for view in net.views().values()), \
        f"seed {seed}: went away at {went_away}; views of n04: {[v['n04'] for v in net.views().values()]}"


@pytest.mark.parametrize("seed", SEEDS)
def test_failed_direct_link_is_bridged_by_indirect_probes(seed: int) -> None:
    net = joined_cluster(10, seed)
    net.partition(["n00"], ["n01"])  # only this one link is down
    net.run_for(120)
    assert not net.events(EventKind.SUSPECT), f"seed {seed}: {net.events(EventKind.SUSPECT)[:3]}"
    assert net.nodes["n00"].core.stats.indirect_probes_sent > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_partitioned_halves_declare_each_other_dead_then_heal(seed: int) -> None:
    n = 10
    net = joined_cluster(n, seed)
    left_half, right_half = ids(0, 5), ids(5, 10)
    net.partition(left_half, right_half)

    def each_side_thinks_the_other_dead() -> bool:
        return all(net.state_seen(a, b) is DEAD and net.state_seen(b, a) is DEAD
                   for a in left_half for b in right_half)

    split = net.run_until(each_side_thinks_the_other_dead, timeout_s=CONFIG.detection_bound_s(n))
    assert split is not None, \
        f"seed {seed}: the halves did not declare each other dead; disagreements: {net.disagreements()}"
    # Past gossip-to-the-dead: only push-pull to dead members can reconnect them.
    net.run_for(CONFIG.gossip_to_dead_s + 5)
    net.heal()
    bound_s = push_pull_interval_s(CONFIG, n) + 2 * CONFIG.dissemination_s(n)
    took = net.run_until(net.all_alive, timeout_s=bound_s)
    assert took is not None, \
        f"seed {seed}: not healed {bound_s} s after the partition ended; disagreements: {net.disagreements()}"


@pytest.mark.parametrize("seed", SEEDS)
def test_graceful_leave_is_seen_as_left_never_dead(seed: int) -> None:
    n = 10
    net = joined_cluster(n, seed)
    net.leave("n03")
    leaver = net.nodes["n03"].core
    assert leaver.tick(net.now + 100) == [] and leaver.next_deadline() == math.inf
    took = net.run_until(lambda: net.all_see("n03", LEFT), timeout_s=CONFIG.dissemination_s(n))
    assert took is not None, f"seed {seed}: LEFT did not spread; disagreements: {net.disagreements()}"
    net.crash("n03")  # the process exits after leaving
    net.run_for(60)
    assert net.all_see("n03", LEFT), f"seed {seed}: disagreements: {net.disagreements()}"
    assert not net.events(EventKind.DEAD), f"seed {seed}: {net.events(EventKind.DEAD)[:3]}"
    assert not net.events(EventKind.SUSPECT, about="n03"), f"seed {seed}: a leaver was suspected"


@pytest.mark.parametrize("seed", SEEDS)
def test_same_seed_same_trace(seed: int) -> None:
    def scenario(seed: int) -> list:
        net = Network(12, seed=seed, config=CONFIG, loss=0.05)
        net.join_all()
        net.run_for(20)
        net.crash("n05")
        net.partition(ids(0, 6), ids(6, 12))
        net.run_for(40)
        net.heal()
        net.run_for(40)
        return net.trace

    first = scenario(seed)
    assert first == scenario(seed), f"seed {seed}: two runs diverged"
    assert first != scenario(seed + 100), "different seeds gave identical traces: is the rng used at all?"


def test_fifty_nodes_ten_minutes_is_fast_and_bounded() -> None:
    seed = 9
    net = joined_cluster(50, seed)
    net.run_for(600)
    assert not net.events(EventKind.SUSPECT), f"seed {seed}: suspicion without faults"
    assert net.stats.largest_piggyback_bytes <= CONFIG.max_gossip_bytes


# -- one core, driven by hand -------------------------------------------------


def make_core(node_id: str = "me", config: MembershipConfig = CONFIG, seed: int = 0) -> Membership:
    return Membership(node_id, f"{node_id}:1", (), config, random.Random(seed), now=0.0)


def alive(node_id: str, incarnation: int = 0, **fields) -> Update:
    return Update(node_id, fields.get("address", f"{node_id}:1"), incarnation, ALIVE,
                  fields.get("labels", ()))


def update(node_id: str, state: State, incarnation: int) -> Update:
    return Update(node_id, f"{node_id}:1", incarnation, state)


def gossip(core: Membership, *updates: Update, sender: str = "peer", now: float = 0.0) -> Gossip:
    return core.on_gossip(Gossip(sender, tuple(updates)), now)


def piggyback_bytes(message) -> int:
    return sum(u.size_bytes() for u in message.updates)


# What the incoming update needs, by (held state, incoming state); absent = never.
NEEDS = {
    (ALIVE, ALIVE): "newer", (SUSPECT, ALIVE): "newer", (DEAD, ALIVE): "newer", (LEFT, ALIVE): "newer",
    (ALIVE, SUSPECT): "same-or-newer", (SUSPECT, SUSPECT): "newer",
    (ALIVE, DEAD): "same-or-newer", (SUSPECT, DEAD): "same-or-newer",
    (ALIVE, LEFT): "same-or-newer", (SUSPECT, LEFT): "same-or-newer", (DEAD, LEFT): "same-or-newer",
}
PRECEDENCE_CASES = [(held, incoming, incarnation)
                    for held in State for incoming in State for incarnation in (1, 2, 3)]


@pytest.mark.parametrize(("held", "incoming", "incarnation"), PRECEDENCE_CASES,
                         ids=[f"{h.name}2-{i.name}{n}" for h, i, n in PRECEDENCE_CASES])
def test_precedence(held: State, incoming: State, incarnation: int) -> None:
    core = make_core()
    gossip(core, alive("x", 2))
    if held is not ALIVE:
        gossip(core, update("x", held, 2))
    assert core.member("x").state is held
    core.drain_events()
    applied_before = core.stats.updates_applied

    reply = gossip(core, update("x", incoming, incarnation), now=1.0)

    need = NEEDS.get((held, incoming))
    wins = (need == "newer" and incarnation > 2) or (need == "same-or-newer" and incarnation >= 2)
    assert overrides(incoming, incarnation, held, 2) is wins
    view = core.member("x")
    if wins:
        assert (view.state, view.incarnation) == (incoming, incarnation)
        assert core.stats.updates_applied == applied_before + 1
        assert update("x", incoming, incarnation) in reply.updates, "a change must be re-broadcast"
        if incoming is not held:
            assert [(e.kind.value, e.incarnation) for e in core.drain_events()] == \
                [(incoming.name.lower(), incarnation)]
    else:
        assert (view.state, view.incarnation) == (held, 2)
        assert core.stats.updates_applied == applied_before, \
            "a stale update must be dropped, not re-broadcast"
        assert core.drain_events() == []


def test_unknown_members_are_learned_only_from_alive() -> None:
    core = make_core()
    gossip(core, update("s", SUSPECT, 1), update("d", DEAD, 1), update("l", LEFT, 1))
    assert [m.node_id for m in core.members()] == ["me"]
    gossip(core, alive("a", 3, labels=(("site", "s1"),)))
    assert core.member("a").labels == (("site", "s1"),)
    assert [(e.kind, e.node_id) for e in core.drain_events()] == [(EventKind.JOINED, "a")]


def test_address_and_label_changes_come_with_a_newer_alive() -> None:
    core = make_core()
    gossip(core, alive("a", 1))
    core.drain_events()
    gossip(core, alive("a", 1, address="a:2"))
    assert core.member("a").address == "a:1"
    gossip(core, alive("a", 2, address="a:2"))
    assert core.member("a").address == "a:2"
    assert [e.kind for e in core.drain_events()] == [EventKind.UPDATED]
    gossip(core, update("a", SUSPECT, 2), alive("a", 3, address="a:3"))
    assert [e.kind for e in core.drain_events()] == [EventKind.SUSPECT, EventKind.ALIVE]


def test_metadata_newer_version_wins_within_an_incarnation() -> None:
    core = make_core()
    gossip(core, Update("a", "a:1", 3, ALIVE, (), 10, b"v10"))
    core.drain_events()
    gossip(core, Update("a", "a:1", 3, ALIVE, (), 9, b"v9"))  # older metadata: ignored
    assert core.member("a").meta == b"v10"
    reply = gossip(core, Update("a", "a:1", 3, ALIVE, (), 11, b"v11"))
    assert (core.member("a").meta_version, core.member("a").meta) == (11, b"v11")
    assert [e.kind for e in core.drain_events()] == [EventKind.META]
    assert any(u.node_id == "a" and u.meta == b"v11" for u in reply.updates)  # re-broadcast
    # A newer incarnation brings its own metadata even with a lower version (a restart).
    gossip(core, Update("a", "a:1", 4, ALIVE, (), 2, b"fresh"))
    assert core.member("a").meta == b"fresh"
    # SUSPECT at the same incarnation keeps the metadata it carries.
    gossip(core, Update("a", "a:1", 4, SUSPECT, (), 2, b"fresh"))
    assert core.member("a").state is SUSPECT and core.member("a").meta == b"fresh"


def test_set_meta_bumps_the_version_and_is_gossiped() -> None:
    core = make_core()
    core.set_meta(b"models")
    core.set_meta(b"models")  # unchanged: no new version
    assert core.member("me").meta_version == 1
    reply = gossip(core)
    assert any(u.node_id == "me" and u.meta == b"models" and u.meta_version == 1 for u in reply.updates)
    # Every update about a member carries its metadata: it must fit the piggyback budget easily.
    assert core.meta_limit_bytes == CONFIG.max_gossip_bytes // 4
    with pytest.raises(ValueError, match=f"at most {core.meta_limit_bytes}"):
        core.set_meta(b"x" * (core.meta_limit_bytes + 1))
    core.set_meta(b"x" * core.meta_limit_bytes)
    assert any(u.node_id == "me" for u in gossip(core).updates)  # still piggybacked


@pytest.mark.parametrize("seed", SEEDS)
def test_metadata_reaches_every_node_and_heals_after_a_partition(seed: int) -> None:
    net = joined_cluster(12, seed)
    side_a, side_b = ids(0, 6), ids(6, 12)
    net.partition(side_a, side_b)
    net.nodes["n03"].core.set_meta(b"face-detect 1.4: chunks 0-7")

    def side_knows(side: list[str]) -> bool:
        return all(net.nodes[o].core.member("n03").meta == b"face-detect 1.4: chunks 0-7" for o in side)

    # Half the gossip targets are across the cut, so gossip misses a node now and
    # then (about 1 seed in 10); push-pull repairs it. A round pairs the node with
    # a peer on its side with probability about 2/3, so allow three rounds.
    within_s = 3 * push_pull_interval_s(CONFIG, 12) + CONFIG.dissemination_s(12)
    assert net.run_until(lambda: side_knows(side_a), timeout_s=within_s) is not None, \
        f"seed {seed}: metadata did not spread within its side in {within_s} s"
    assert not side_knows(side_b), f"seed {seed}: metadata crossed the partition"
    net.heal()
    # The other side gets it by gossip or, at the latest, by push-pull after healing.
    took = net.run_until(lambda: side_knows(side_b), timeout_s=push_pull_interval_s(CONFIG, 12) * 3 + 30)
    assert took is not None, f"seed {seed}: metadata did not cross the healed partition"


@pytest.mark.parametrize("state", [SUSPECT, DEAD, LEFT])
def test_node_refutes_rumours_about_itself(state: State) -> None:
    core = make_core()
    gossip(core, update("me", state, 0))
    assert core.incarnation == 1 and core.member("me").state is ALIVE
    reply = gossip(core, update("me", state, 4))
    assert core.incarnation == 5
    assert alive("me", 5) in reply.updates
    assert core.stats.refutations == 2
    # An old rumour changes nothing but is answered with the current ALIVE.
    reply = gossip(core, update("me", state, 3), sender="stale")
    assert core.incarnation == 5 and alive("me", 5) in reply.updates
    assert core.drain_events() == []


def test_restarted_node_jumps_above_its_previous_incarnation() -> None:
    core = make_core()
    core.on_push_pull_reply(PushPull("seed", (alive("seed"), alive("me", 7, address="old:1"))), 0.0)
    assert core.incarnation == 8 and core.member("me").address == "me:1"
    gossip(core, alive("me", 8))
    assert core.incarnation == 8


@pytest.mark.parametrize("lifeguard", [False, True])
def test_probe_cycle_direct_then_indirect_then_suspect_then_dead(lifeguard: bool) -> None:
    """Plain SWIM declares the suspect dead after suspicion_timeout_s; Lifeguard,
    with no other member confirming, after the maximum timeout."""
    config = MembershipConfig(probe_interval_s=1.0, probe_timeout_s=0.5, indirect_checks=2,
                              push_pull_interval_s=1000.0, suspicion_mult=4, lifeguard=lifeguard)
    core = make_core(config=config)
    core.on_push_pull_reply(PushPull("a", (alive("a"), alive("b"), alive("c"))), 0.0)

    def tick_until(end: float) -> list[tuple[float, Send]]:
        sent = []
        while (now := core.next_deadline()) <= end:
            sent += [(now, send) for send in core.tick(now)]
        return sent

    started, ping = next((now, s) for now, s in tick_until(1.0) if isinstance(s.message, Ping))
    target = ping.target_id
    asked = [s for _, s in tick_until(started + 0.5) if isinstance(s.message, PingReq)]
    assert len(asked) == 2 and target not in {s.target_id for s in asked}
    assert all((s.message.target, s.message.seq) == (target, ping.message.seq) for s in asked)
    tick_until(started + 0.99)
    assert core.member(target).state is ALIVE
    tick_until(started + 1.0)
    assert core.member(target).state is SUSPECT and core.stats.probes_failed == 1
    timeout_s = config.suspicion_max_timeout_s(4) if lifeguard else config.suspicion_timeout_s(4)
    assert core.suspicion_deadline(target) == pytest.approx(started + 1.0 + timeout_s)
    tick_until(started + 1.0 + timeout_s - 0.01)
    assert core.member(target).state is SUSPECT
    tick_until(started + 1.0 + timeout_s)
    assert core.member(target).state is DEAD
    kinds = [e.kind for e in core.drain_events() if e.node_id == target]
    assert kinds == [EventKind.JOINED, EventKind.SUSPECT, EventKind.DEAD]


def test_relayed_ack_completes_the_probe() -> None:
    cores = {node_id: make_core(node_id, seed=i) for i, node_id in enumerate(["a", "b", "c"])}
    for core in cores.values():
        core.on_push_pull_reply(PushPull("a", (alive("a"), alive("b"), alive("c"))), 0.0)
    requester = cores["a"]
    now, ping = 0.0, None
    while ping is None:
        now = requester.next_deadline()
        ping = next((s.message for s in requester.tick(now) if isinstance(s.message, Ping)), None)
    target = cores[ping.target]
    relay = cores[({"b", "c"} - {ping.target}).pop()]
    req = PingReq("a", ping.target, f"{ping.target}:1", ping.seq)
    relayed_ping = relay.on_ping_req(req, now + 0.5)
    assert relayed_ping.target == ping.target and relayed_ping.sender == relay.node_id
    ack = relay.on_relayed_ack(req, target.on_ping(relayed_ping, now + 0.5), now + 0.5)
    assert (ack.sender, ack.seq) == (ping.target, ping.seq)
    requester.on_ack(ack, now + 0.6)
    requester.tick(now + 1.0)
    assert requester.member(ping.target).state is ALIVE and requester.stats.probes_failed == 0
    assert requester.member(ping.target).last_heard == now + 0.6


def test_bad_requests_raise_typed_errors() -> None:
    core = make_core()
    with pytest.raises(WrongTarget, match="is for 'other'"):
        core.on_ping(Ping("a", "other", 1), 0.0)
    with pytest.raises(UnknownMember, match="never heard of"):
        core.on_ping_req(PingReq("a", "ghost", "ghost:1", 1), 0.0)
    gossip(core, alive("t"))
    with pytest.raises(WrongTarget):
        core.on_relayed_ack(PingReq("a", "t", "t:1", 1), Ack("impostor", 5), 0.0)


def test_join_skips_own_address_and_leave_is_final() -> None:
    core = make_core()
    sends = core.join(["me:1", "s1:1", "s2:1", "s1:1"], 0.0)
    assert [(s.address, s.target_id) for s in sends] == [("s1:1", None), ("s2:1", None)]
    assert all(isinstance(s.message, PushPull) and alive("me") in s.message.members for s in sends)
    gossip(core, *(alive(f"p{i}") for i in range(20)))
    sends = core.leave(1.0)
    assert len(sends) == 3 * CONFIG.gossip_nodes
    assert all(s.message.updates[0] == update("me", LEFT, 1) for s in sends)
    assert core.member("me").state is LEFT and core.live_count() == 20
    gossip(core, update("me", SUSPECT, 5))
    assert core.incarnation == 1, "a node that left does not refute"
    assert core.tick(50.0) == [] and core.leave(2.0) == []


def test_piggyback_never_exceeds_the_budget() -> None:
    config = MembershipConfig(max_gossip_bytes=1024, push_pull_interval_s=1000.0)
    core = make_core(config=config)
    labels = (("site", "a-rather-long-site-name"), ("rack", "r17"))
    crowd = [alive(f"node-{i:05d}", i % 7, labels=labels if i % 3 else ()) for i in range(5000)]
    core.on_push_pull(PushPull(crowd[0].node_id, tuple(crowd)), 0.0)
    for i in range(0, 5000, 10):  # suspects: messages to them carry an accusation first
        gossip(core, update(crowd[i].node_id, SUSPECT, i % 7))
    largest = max(u.size_bytes() for u in crowd)

    replies = [core.on_ping(Ping(crowd[i].node_id, "me", i), 1.0) for i in range(0, 200, 5)]
    replies += [gossip(core, sender=crowd[i].node_id, now=1.0) for i in range(0, 200, 5)]
    replies += [core.on_relayed_ack(PingReq(crowd[i].node_id, crowd[1].node_id, "x:1", 1),
                                    Ack(crowd[1].node_id, 1), 1.0) for i in range(0, 100, 5)]
    sent, now = [], 0.0
    while now < 30.0:
        now = core.next_deadline()
        sent += [s.message for s in core.tick(now) if not isinstance(s.message, PushPull)]
    assert any(isinstance(m, PingReq) for m in sent) and any(isinstance(m, Gossip) for m in sent)
    for message in replies + sent:
        size = piggyback_bytes(message)
        assert size <= config.max_gossip_bytes, f"{type(message).__name__} carries {size} bytes"
        assert size > config.max_gossip_bytes - largest, f"{type(message).__name__} left its budget unused"


# -- arbitrary input ------------------------------------------------------------

NODE_IDS = ["me", "a", "b", "c", "d"]
node_ids = st.sampled_from(NODE_IDS)
updates = st.builds(Update, node_id=node_ids, address=st.sampled_from(["a:1", "b:1", "z:9"]),
                    incarnation=st.integers(0, 5), state=st.sampled_from(State),
                    labels=st.sampled_from([(), (("site", "s1"),)]), accuser=st.sampled_from(["", *NODE_IDS]))
update_lists = st.lists(updates, max_size=6).map(tuple)
seqs = st.integers(0, 40)
steps = st.one_of(
    st.tuples(st.just("tick"), st.floats(0, 3)),
    st.tuples(st.just("gossip"), node_ids, update_lists),
    st.tuples(st.just("gossip_reply"), node_ids, update_lists),
    st.tuples(st.just("ping"), node_ids, node_ids, seqs, update_lists),
    st.tuples(st.just("ack"), node_ids, seqs, update_lists),
    st.tuples(st.just("ping_req"), node_ids, node_ids, seqs, update_lists),
    st.tuples(st.just("relayed_ack"), node_ids, node_ids, seqs, update_lists),
    st.tuples(st.just("push_pull"), node_ids, update_lists),
    st.tuples(st.just("push_pull_reply"), node_ids, update_lists, st.sampled_from(["", "b", "me"])),
    st.tuples(st.just("nack"), node_ids, seqs, update_lists),
)


def _play(core: Membership, step: tuple, now: float) -> list:
    """Feed one step; return every message the core produced."""
    kind, *args = step
    try:
        if kind == "gossip":
            return [core.on_gossip(Gossip(args[0], args[1]), now)]
        if kind == "gossip_reply":
            return [core.on_gossip_reply(Gossip(args[0], args[1]), now)]
        if kind == "ping":
            return [core.on_ping(Ping(args[0], args[1], args[2], args[3]), now)]
        if kind == "ack":
            return [core.on_ack(Ack(args[0], args[1], args[2]), now)]
        if kind == "ping_req":
            req = PingReq(args[0], args[1], f"{args[1]}:1", args[2], args[3])
            return [core.on_ping_req(req, now)]
        if kind == "relayed_ack":
            req = PingReq(args[0], args[1], f"{args[1]}:1", args[2])
            return [core.on_relayed_ack(req, Ack(args[1], 99, args[3]), now)]
        if kind == "push_pull":
            return [core.on_push_pull(PushPull(args[0], args[1]), now)]
        if kind == "push_pull_reply":
            follow_ups = core.on_push_pull_reply(PushPull(args[0], args[1], page_end=args[2]), now)
            return [s.message for s in follow_ups]
        if kind == "nack":
            return [core.on_nack(Nack(args[0], args[1], args[2]), now)]
    except (WrongTarget, UnknownMember):
        return []
    raise AssertionError(kind)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), script=st.lists(steps, max_size=40))
def test_arbitrary_input_keeps_the_core_consistent(seed: int, script: list) -> None:
    core = make_core(seed=seed)
    now, incarnations, joined = 0.0, {}, set()
    for step in script:
        if step[0] == "tick":
            now += step[1]
            produced = [s.message for s in core.tick(now)]
            assert core.next_deadline() > now, "tick left work due now: the adapter would spin"
        else:
            produced = [m for m in _play(core, step, now) if m is not None]
        for message in produced:
            if not isinstance(message, PushPull):
                assert piggyback_bytes(message) <= CONFIG.max_gossip_bytes
        views = core.members()
        assert [v.node_id for v in views] == sorted({v.node_id for v in views})
        assert core.member("me").state is ALIVE
        assert core.live_count() == sum(v.state in (ALIVE, SUSPECT) for v in views)
        for v in views:
            assert v.incarnation >= incarnations.get(v.node_id, 0), f"{v.node_id} went back in incarnation"
            incarnations[v.node_id] = v.incarnation
        for event in core.drain_events():
            assert event.node_id != "me"
            assert (event.kind is EventKind.JOINED) is (event.node_id not in joined)
            joined.add(event.node_id)
    # Left alone long enough, every timer fires: the silent others all end up dead.
    end = now + 200
    while (deadline := core.next_deadline()) <= end:
        core.tick(deadline)
    assert all(v.state in (DEAD, LEFT) for v in core.members() if v.node_id != "me"), core.members()
    assert core.member("me").state is ALIVE
