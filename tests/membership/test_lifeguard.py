"""Lifeguard in the pure core: local health, confirmation-scaled suspicion, early
notice, nacks; and the pool a core belongs to. One core driven by hand."""

from __future__ import annotations

import random

import pytest

from mesh.membership.config import FEDERATION_POOL, MembershipConfig, lifeguard_suspicion_timeout_s
from mesh.membership.core import Membership
from mesh.membership.messages import (
    Ack,
    Gossip,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Send,
    State,
    Update,
    WrongPool,
)

CONFIG = MembershipConfig(push_pull_interval_s=1000.0)
PEERS = [f"p{i}" for i in range(12)]


def alive(node_id: str, incarnation: int = 0) -> Update:
    return Update(node_id, f"{node_id}:1", incarnation, State.ALIVE)


def suspect(node_id: str, accuser: str, incarnation: int = 0) -> Update:
    return Update(node_id, f"{node_id}:1", incarnation, State.SUSPECT, accuser=accuser)


def make_core(config: MembershipConfig = CONFIG, peers: list[str] = PEERS, seed: int = 0) -> Membership:
    return Membership("me", "me:1", (), config, random.Random(seed), 0.0,
                      known=[alive(p) for p in peers])


def next_probe(core: Membership, within_s: float = 60.0) -> tuple[float, Send]:
    """Tick until the core sends a Ping; (when, the Send)."""
    now = start = core.next_deadline()
    while now < start + within_s:
        for send in core.tick(now):
            if isinstance(send.message, Ping):
                return now, send
        now = core.next_deadline()
    raise AssertionError(f"no probe within {within_s} s")


def run_probe_cycle(core: Membership, *, ack: bool = False, nacks: int = 0) -> tuple[float, Send, list[Send]]:
    """One probe cycle to its end: the target acks directly, or relays nack (`nacks` of them)."""
    started, ping = next_probe(core)
    if ack:
        core.on_ack(Ack(ping.target_id, ping.message.seq), started + 0.01)
        return started, ping, []
    sent: list[Send] = []
    while (now := core.next_deadline()) < started + core.probe_interval_s:
        sent += core.tick(now)
    asked = [s for s in sent if isinstance(s.message, PingReq)]
    for send in asked[:nacks]:
        core.on_nack(Nack(send.target_id, send.message.seq), now)
    sent += core.tick(started + core.probe_interval_s)
    return started, ping, sent


# -- memberlist's formula ----------------------------------------------------------


@pytest.mark.parametrize(("confirmations", "expected", "timeout_s"), [
    # memberlist's suspicion_test.go: k=3, min 2 s, max 30 s
    (0, 3, 30.0), (1, 3, 16.0), (2, 3, 7.81), (3, 3, 2.0), (4, 3, 2.0), (0, 0, 2.0),
])
def test_suspicion_timeout_shrinks_with_the_log_of_confirmations(confirmations: int, expected: int,
                                                                   timeout_s: float) -> None:
    timeout = lifeguard_suspicion_timeout_s(confirmations, expected, 2.0, 30.0)
    assert timeout == pytest.approx(timeout_s, abs=0.01)


def test_config_derives_lifeguard_bounds_like_memberlist() -> None:
    n = 100
    assert CONFIG.suspicion_timeout_s(n) == 4 * 2 * 1.0          # SuspicionMult * log10(n) * ProbeInterval
    assert CONFIG.suspicion_max_timeout_s(n) == 6 * CONFIG.suspicion_timeout_s(n)
    assert CONFIG.suspicion_confirmations_expected(n) == 2       # SuspicionMult - 2
    assert CONFIG.suspicion_confirmations_expected(3) == 0       # nobody else to confirm
    with pytest.raises(ValueError, match="pool"):
        MembershipConfig(pool="Not A Pool")


# -- local health ------------------------------------------------------------------


def test_failed_probe_without_nacks_lowers_local_health_and_stretches_probing() -> None:
    core = make_core()
    started, ping, sent = run_probe_cycle(core, nacks=0)
    assert core.health_score == CONFIG.indirect_checks    # one per silent relay
    assert core.member(ping.target_id).state is State.SUSPECT
    stretch = CONFIG.indirect_checks + 1
    assert core.probe_interval_s == CONFIG.probe_interval_s * stretch
    # The next probe starts as this one ends, with the stretched timeout and interval.
    [second] = [s for s in sent if isinstance(s.message, Ping)]
    assert second.timeout_s == pytest.approx(CONFIG.probe_timeout_s * stretch)
    second_at = started + CONFIG.probe_interval_s
    asked: list[Send] = []
    while not asked:
        now = core.next_deadline()
        asked = [s for s in core.tick(now) if isinstance(s.message, PingReq)]
    assert now == pytest.approx(second_at + CONFIG.probe_timeout_s * stretch)
    assert asked[0].timeout_s == pytest.approx((CONFIG.probe_interval_s - CONFIG.probe_timeout_s) * stretch)


def test_relays_that_nack_keep_local_health() -> None:
    core = make_core()
    run_probe_cycle(core, nacks=CONFIG.indirect_checks)
    assert core.health_score == 0
    assert core.stats.nacks_received == CONFIG.indirect_checks
    core = make_core()
    run_probe_cycle(core, nacks=1)
    assert core.health_score == CONFIG.indirect_checks - 1


def test_acks_and_refutations_move_local_health_within_bounds() -> None:
    core = make_core()
    for _ in range(5):
        run_probe_cycle(core)
    assert core.health_score == CONFIG.awareness_max_multiplier - 1    # clamped
    run_probe_cycle(core, ack=True)
    assert core.health_score == CONFIG.awareness_max_multiplier - 2
    core = make_core()
    core.on_gossip(Gossip("p1", (suspect("me", "p1"),)), 1.0)
    assert core.incarnation == 1 and core.health_score == 1     # being accused: maybe we are the slow one


def test_plain_swim_keeps_its_timing() -> None:
    config = MembershipConfig(push_pull_interval_s=1000.0, lifeguard=False)
    core = make_core(config)
    run_probe_cycle(core)
    core.on_gossip(Gossip("p1", (suspect("me", "p1"),)), 1.0)
    assert core.health_score == 0 and core.probe_interval_s == config.probe_interval_s


# -- suspicion and confirmations -----------------------------------------------------


def test_independent_accusers_shorten_the_suspicion_down_to_the_minimum() -> None:
    core = make_core()
    n = core.live_count()
    min_s, max_s = CONFIG.suspicion_timeout_s(n), CONFIG.suspicion_max_timeout_s(n)
    reply = core.on_gossip(Gossip("p1", (suspect("p5", "p1"),)), 10.0)
    assert core.suspicion_deadline("p5") == pytest.approx(10.0 + max_s)
    assert any(u.node_id == "p5" and u.accuser == "p1" for u in reply.updates)
    # The accuser who started it, an unknown accuser and a repeat are no confirmations.
    for accuser in ("p1", ""):
        core.on_gossip(Gossip("p2", (suspect("p5", accuser),)), 11.0)
    assert core.suspicion_deadline("p5") == pytest.approx(10.0 + max_s)
    reply = core.on_gossip(Gossip("p3", (suspect("p5", "p2"),)), 12.0)
    one = lifeguard_suspicion_timeout_s(1, 2, min_s, max_s)
    assert core.suspicion_deadline("p5") == pytest.approx(10.0 + one)
    assert any(u.node_id == "p5" and u.accuser == "p2" for u in reply.updates), \
        "a confirmation is re-gossiped"
    core.on_gossip(Gossip("p3", (suspect("p5", "p2"),)), 12.5)
    assert core.suspicion_deadline("p5") == pytest.approx(10.0 + one)
    core.on_gossip(Gossip("p4", (suspect("p5", "p3"),)), 13.0)
    assert core.suspicion_deadline("p5") == pytest.approx(10.0 + min_s)
    assert core.stats.confirmations == 2
    core.tick(10.0 + min_s)
    assert core.member("p5").state is State.DEAD


def test_elapsed_confirmations_expire_at_once() -> None:
    """A confirmation that arrives after the shorter timeout has passed ends it on the next tick."""
    core = make_core()
    min_s = CONFIG.suspicion_timeout_s(core.live_count())
    core.on_gossip(Gossip("p1", (suspect("p5", "p1"),)), 0.0)
    core.on_gossip(Gossip("p2", (suspect("p5", "p2"),)), min_s + 5)
    core.on_gossip(Gossip("p3", (suspect("p5", "p3"),)), min_s + 6)
    assert core.next_deadline() <= min_s + 6
    core.tick(min_s + 6)
    assert core.member("p5").state is State.DEAD


def test_our_failed_probe_of_a_suspect_is_a_confirmation() -> None:
    core = make_core(peers=["p0", "p1", "p2", "p3"])
    core.on_gossip(Gossip("p1", (suspect("p0", "p1"),)), 0.0)
    before = core.suspicion_deadline("p0")
    for _ in range(4):   # the others ack; p0 is probed within one round
        started, ping = next_probe(core)
        if ping.target_id == "p0":
            break
        core.on_ack(Ack(ping.target_id, ping.message.seq), started)
    assert ping.target_id == "p0"
    sent = []
    while (now := core.next_deadline()) <= started + core.probe_interval_s:
        sent += core.tick(now)
    assert core.stats.confirmations == 1 and core.suspicion_deadline("p0") < before
    assert core.member("p0").state is State.SUSPECT
    assert any(u == suspect("p0", "me") for s in sent for u in s.message.updates), \
        "the confirmation is gossiped"


@pytest.mark.parametrize("seed", range(5))
def test_a_failed_probe_tells_the_suspect_at_once(seed: int) -> None:
    """Plain SWIM tells up to gossip_nodes suspects, chosen at random, once per probe
    interval; with Lifeguard the new suspect is always told when the probe fails."""
    core = make_core(seed=seed)
    for p in PEERS[6:]:   # suspects already, more than gossip_nodes of them
        core.on_gossip(Gossip("p0", (suspect(p, "p0"),)), 0.0)
    while True:
        _, ping, sent = run_probe_cycle(core)
        if ping.target_id in PEERS[:6]:
            break
    notices = [s for s in sent if isinstance(s.message, Gossip) and s.target_id == ping.target_id
               and s.message.updates[0] == suspect(ping.target_id, "me")]
    assert notices, f"seed {seed}: the new suspect was not told, accusation first"


def test_plain_swim_suspicion_is_fixed() -> None:
    config = MembershipConfig(push_pull_interval_s=1000.0, lifeguard=False)
    core = make_core(config)
    core.on_gossip(Gossip("p1", (suspect("p5", "p1"),)), 10.0)
    core.on_gossip(Gossip("p2", (suspect("p5", "p2"),)), 11.0)
    fixed_s = config.suspicion_timeout_s(core.live_count())
    assert core.suspicion_deadline("p5") == pytest.approx(10.0 + fixed_s)
    assert core.stats.confirmations == 0


def test_new_metadata_of_a_suspect_does_not_restart_its_timer() -> None:
    core = make_core()
    core.on_gossip(Gossip("p1", (suspect("p5", "p1"),)), 10.0)
    deadline = core.suspicion_deadline("p5")
    core.on_gossip(Gossip("p2", (Update("p5", "p5:1", 0, State.SUSPECT, (), 3, b"v3", "p1"),)), 20.0)
    assert core.member("p5").meta == b"v3" and core.suspicion_deadline("p5") == deadline


# -- relays and nacks ------------------------------------------------------------------


def test_relay_answers_a_nack_within_the_requesters_time() -> None:
    relay = make_core()
    req = PingReq("p1", "p2", "p2:1", 41)
    ping = relay.on_ping_req(req, 0.0)
    assert ping.target == "p2"
    assert relay.relay_timeout_s(None) == CONFIG.probe_timeout_s
    assert relay.relay_timeout_s(0.4) == pytest.approx(0.32)     # 80% of what the requester has left
    assert relay.relay_timeout_s(-1.0) == 0.0
    nack = relay.nack_for(req, 0.3)
    assert (nack.sender, nack.seq) == ("me", 41)


def test_nacks_from_strangers_or_for_other_probes_do_not_count() -> None:
    core = make_core()
    started, ping = next_probe(core)
    core.tick(started + CONFIG.probe_timeout_s)
    core.on_nack(Nack("p999", ping.message.seq), started + 0.6)
    core.on_nack(Nack("p1", ping.message.seq + 1), started + 0.6)
    assert core.stats.nacks_received == 0


# -- pools -------------------------------------------------------------------------------


def test_requests_carry_the_pool_and_other_pools_are_refused() -> None:
    federation = make_core(MembershipConfig(push_pull_interval_s=1.0, pool=FEDERATION_POOL))
    sent = []
    now = 0.0
    while now < 3.0:
        now = federation.next_deadline()
        sent += federation.tick(now)
    requests = [s.message for s in sent]
    assert {type(m) for m in requests} >= {Ping, PushPull}
    assert all(m.pool == FEDERATION_POOL for m in requests)
    for message, handler in ((Ping("p1", "me", 1), federation.on_ping), (Gossip("p1"), federation.on_gossip),
                             (PushPull("p1"), federation.on_push_pull),
                             (PingReq("p1", "p2", "p2:1", 1), federation.on_ping_req)):
        with pytest.raises(WrongPool, match="federation"):
            handler(message, now)
    site = make_core()
    assert site.on_ping(Ping("p1", "me", 1), 0.0).sender == "me"
