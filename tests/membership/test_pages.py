"""Bounded push-pull: at 10,000 members with metadata at its limit every page stays
under the gRPC message cap; a join pulls every page, and anti-entropy rounds walk
the table. Pure cores, messages passed by hand and through the real protobuf
encoding; then a partition heal on the simulated network with small pages."""

from __future__ import annotations

import random

import pytest

from mesh.membership import wire
from mesh.membership.config import MembershipConfig
from mesh.membership.core import MAX_META_BYTES, MAX_UPDATES_PER_MESSAGE, Membership, push_pull_interval_s
from mesh.membership.messages import EventKind, PushPull, Send, State, Update
from mesh.node.peers import MAX_MESSAGE_BYTES
from mesh.sim.netsim import Network

MEMBERS = 10_000
LABELS = (("device_class", "camera"), ("site", "site-0042"))
FULL_META = bytes(range(256)) * (MAX_META_BYTES // 256)
CONFIG = MembershipConfig()


def crowd(n: int = MEMBERS, meta: bytes = FULL_META) -> list[Update]:
    return [Update(f"site-0042-device-{i:05d}", f"10.42.{i // 250}.{i % 250}:7946", 3, State.ALIVE, LABELS,
                   1_700_000_000_000 + i, meta) for i in range(n)]


def encoded_bytes(pp: PushPull) -> int:
    return wire.push_pull_to_pb(pp).ByteSize()


def exchange(caller: Membership, callee: Membership, send: Send,
             now: float) -> tuple[PushPull, PushPull, list[Send]]:
    request = send.message
    assert isinstance(request, PushPull)
    reply = callee.on_push_pull(wire.push_pull_from_pb(wire.push_pull_to_pb(request)), now)
    follow_up = caller.on_push_pull_reply(wire.push_pull_from_pb(wire.push_pull_to_pb(reply)), now)
    return request, reply, follow_up


def test_a_join_pulls_a_10000_member_site_in_pages_under_the_cap() -> None:
    members = crowd()
    assert len(FULL_META) == MAX_META_BYTES
    assert sum(u.size_bytes() for u in members) > 10 * MAX_MESSAGE_BYTES, "one full state would not fit"
    seed = Membership(members[0].node_id, members[0].address, LABELS, CONFIG, random.Random(1), 0.0,
                      known=members[1:])
    joiner = Membership("site-0042-new", "10.42.99.1:7946", LABELS, CONFIG, random.Random(2), 0.0)
    sends = joiner.join([seed.address], 0.0)
    sizes = []
    while sends:
        [send] = sends
        request, reply, sends = exchange(joiner, seed, send, 1.0)
        sizes += [encoded_bytes(request), encoded_bytes(reply)]
        assert len(reply.members) <= MAX_UPDATES_PER_MESSAGE
    assert max(sizes) < MAX_MESSAGE_BYTES
    assert max(sizes) <= CONFIG.max_push_pull_bytes
    pages = len(sizes) // 2
    assert pages == pytest.approx(MEMBERS * members[0].size_bytes() / CONFIG.max_push_pull_bytes, rel=0.1)
    assert joiner.live_count() == MEMBERS + 1
    assert len([e for e in joiner.drain_events() if e.kind is EventKind.JOINED]) == MEMBERS
    assert joiner.member(members[-1].node_id).meta == FULL_META
    print(f"{pages} pages, largest {max(sizes)} bytes encoded (cap {MAX_MESSAGE_BYTES})")


def test_pages_of_small_entries_are_cut_at_the_update_count_limit() -> None:
    members = crowd(MEMBERS, meta=b"")
    core = Membership("me", "me:1", (), CONFIG, random.Random(1), 0.0, known=members)
    sends = []
    now = 0.0
    while not sends:
        now = core.next_deadline()
        sends = [s for s in core.tick(now) if isinstance(s.message, PushPull)]
    page = sends[0].message
    assert len(page.members) == MAX_UPDATES_PER_MESSAGE
    assert encoded_bytes(page) < CONFIG.max_push_pull_bytes
    wire.push_pull_from_pb(wire.push_pull_to_pb(page))    # the receiver accepts it


@pytest.mark.parametrize("seed", [1, 2])
def test_anti_entropy_rounds_walk_the_whole_table(seed: int) -> None:
    """A newer entry anywhere in the table reaches a peer within one walk of pages."""
    members = crowd()
    a = Membership("a-node", "a:1", (), CONFIG, random.Random(seed), 0.0, known=members + [
        Update("b-node", "b:1", 0, State.ALIVE)])
    # b holds newer metadata for the last member in id order.
    last = members[-1]
    newer = Update(last.node_id, last.address, last.incarnation, State.ALIVE, LABELS, last.meta_version + 1,
                   b"holds face-detect 1.4")
    b = Membership("b-node", "b:1", (), CONFIG, random.Random(seed + 1), 0.0, known=[*members[:-1], newer,
                   Update("a-node", "a:1", 0, State.ALIVE)])
    pages = -(-sum(u.size_bytes() for u in members) // CONFIG.max_push_pull_bytes)
    rounds, now = 0, 0.0
    while a.member(last.node_id).meta != newer.meta:
        assert rounds <= pages + 1, f"seed {seed}: not found after {rounds} rounds of pages"
        now = a.next_deadline()
        # Whichever members a picked (a live one, and a dead one once its unanswered
        # probes have killed some), they answer with b's table.
        exchanges = [exchange(a, b, send, now) for send in a.tick(now) if isinstance(send.message, PushPull)]
        rounds += bool(exchanges)
    assert rounds >= pages - 1, f"seed {seed}: found in {rounds} rounds, fewer than the {pages} pages"


# -- on the simulated network, with pages of a few members -----------------------------------

SMALL_PAGES = MembershipConfig(probe_interval_s=1.0, probe_timeout_s=0.5, gossip_interval_s=0.2,
                               push_pull_interval_s=10.0, gossip_to_dead_s=10.0, max_push_pull_bytes=1024)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_partition_heals_with_paged_push_pull(seed: int) -> None:
    n = 20
    net = Network(n, seed=seed, config=SMALL_PAGES)
    full_state_bytes = n * Update("n00", "n00:1", 0, State.ALIVE).size_bytes()
    assert full_state_bytes > 1.5 * SMALL_PAGES.max_push_pull_bytes, "the test needs several pages"
    net.join_all()
    took = net.run_until(net.all_alive, timeout_s=60)
    assert took is not None, f"seed {seed}: no convergence with small pages: {net.disagreements()}"
    assert net.stats.largest_push_pull_bytes <= SMALL_PAGES.max_push_pull_bytes, \
        f"seed {seed}: a page of {net.stats.largest_push_pull_bytes} bytes"
    left, right = [f"n{i:02d}" for i in range(10)], [f"n{i:02d}" for i in range(10, 20)]
    net.partition(left, right)
    split = net.run_until(lambda: all(net.state_seen(a, b) is State.DEAD for a in left for b in right),
                          timeout_s=SMALL_PAGES.detection_bound_s(n) * 2)
    assert split is not None, f"seed {seed}: the halves did not declare each other dead"
    net.run_for(SMALL_PAGES.gossip_to_dead_s + 5)
    net.heal()
    bound_s = push_pull_interval_s(SMALL_PAGES, n) + 2 * SMALL_PAGES.dissemination_s(n)
    took = net.run_until(net.all_alive, timeout_s=bound_s)
    assert took is not None, f"seed {seed}: not healed in {bound_s} s; disagreements: {net.disagreements()}"
