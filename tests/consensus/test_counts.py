"""What a site group's replicas count for their metrics: proposals by outcome on the member that
proposed, guard verdicts and approval outcomes on every replica that applied them, once each
(a restart's journal replay counts nothing again), and audit writes that failed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mesh.consensus.counts import GroupCounts
from mesh.consensus.ledger import Outcome
from mesh.consensus.raft import NoLeaderError
from mesh.guard.approval import sign_approval
from mesh.identity.signing import SigningKey
from mesh.node.local import wait_for
from tests.consensus.harness import NODE_KEY, ROUTES, big, move, small


def approval(key: SigningKey, decision, *, nonce: str, approve: bool = True):
    return sign_approval(key, decision, now=time.time(), ttl_s=300.0, nonce=nonce, approve=approve,
                         reason="checked the cameras")


@pytest.mark.asyncio
async def test_verdicts_approvals_and_proposals_are_counted_where_they_happen(site, operator_key):
    s = await site(3)
    groups = s.start_all()
    leader = await s.wait_leader()
    follower = next(g for g in groups if g is not leader)
    await leader.set_routes(ROUTES)
    assert (await follower.propose(small())).outcome is Outcome.APPLIED
    held = big()
    assert (await follower.propose(held)).outcome is Outcome.HELD
    # Signed by a node key, a denial of the held decision, then the operator's approval.
    assert (await leader.approve(approval(NODE_KEY, held, nonce="node-00001"))).outcome is Outcome.REFUSED
    assert (await leader.approve(approval(operator_key, held, nonce="appr-00001"))).outcome is Outcome.APPLIED
    # Answering a decision no longer held.
    assert (await leader.deny(approval(operator_key, held, nonce="deny-00001", approve=False))).outcome \
        is Outcome.REFUSED
    await s.converged()

    for g in groups:  # every replica judged and checked the same entries
        counts = g.counts.snapshot()
        assert counts.verdicts == {("move_streams", "allow"): 1, ("move_streams", "hold"): 1}, g.node_id
        assert counts.approvals == {"not_operator_key": 1, "approved": 1, "not_pending": 1}, g.node_id
        assert counts.audit_failures == 0
    assert leader.counts.snapshot().proposals == {("set_routes", "committed"): 1}
    assert follower.counts.snapshot().proposals == {("move_streams", "committed"): 1,
                                                    ("move_streams", "held"): 1}

    # A restarted replica replays its journal: it counts nothing again, only what is new.
    index = groups.index(follower)
    await s.close(follower)
    restarted = s.start(index)
    await s.converged()
    assert restarted.counts.snapshot().verdicts == {}
    back = move(("cam-0", "node-2", "node-1"), nonce="back-00001")
    assert (await leader.propose(back)).outcome is Outcome.APPLIED
    await s.converged()
    assert restarted.counts.snapshot().verdicts == {("move_streams", "allow"): 1}
    assert leader.counts.snapshot().verdicts == {("move_streams", "allow"): 2, ("move_streams", "hold"): 1}


@pytest.mark.asyncio
async def test_a_proposal_without_a_leader_is_counted_as_not_leader(site):
    s = await site(3)
    groups = s.start_all()
    leader = await s.wait_leader()
    alone = next(g for g in groups if g is not leader)
    others = [g for g in groups if g is not alone]
    alone.raft.cut(*(g.node_id for g in others))
    for g in others:
        g.raft.cut(alone.node_id)
    await wait_for(lambda: alone.raft.leader_id is None, 10.0, what=f"{alone.node_id} loses its leader")
    with pytest.raises(NoLeaderError):
        await alone.set_routes({"cam-x": "node-0"}, timeout_s=3.0)
    assert alone.counts.snapshot().proposals == {("set_routes", "not_leader"): 1}


@pytest.mark.asyncio
async def test_an_audit_write_that_fails_is_counted(site):
    s = await site(1)
    (group,) = s.start_all()
    await s.wait_leader()
    real = os.path.realpath(group.audit_path)
    (fd,) = [int(f.name) for f in Path("/proc/self/fd").iterdir() if os.path.realpath(f) == real]
    full = os.open("/dev/full", os.O_WRONLY)  # the disk is full from now on (ENOSPC)
    try:
        os.dup2(full, fd)
    finally:
        os.close(full)
    assert (await group.set_routes(ROUTES)).outcome is Outcome.APPLIED
    assert group.counts.snapshot().audit_failures == 1
    assert group.status()["audit_error"]


def test_counts_are_copies():
    counts = GroupCounts()
    counts.proposed("set_routes", "committed")
    snapshot = counts.snapshot()
    counts.proposed("set_routes", "committed")
    assert snapshot.proposals == {("set_routes", "committed"): 1}
    assert counts.snapshot().proposals == {("set_routes", "committed"): 2}

