"""The site group runs the rollout ledger beside the decision ledger: one replicated state machine that
dispatches each command by its name, one snapshot holding both, both audited once per Raft index. Real
Raft groups on loopback (tests/consensus/harness.py)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import pytest_asyncio

from mesh.consensus.group import _SNAPSHOT_MAGIC_V1, GroupError, _AuditedLedger
from mesh.consensus.ledger import DecisionLedger
from mesh.consensus.raft import RaftTimings
from mesh.guard.audit import AuditLog
from mesh.node.local import LocalFleet, wait_for
from mesh.rollout.plan import AutonomousScope, CommandAction, sign_command, sign_plan
from mesh.rollout.state import (
    OperatorInput,
    Outcome,
    RolloutLedger,
    RolloutState,
    Start,
    encode_input,
    plan_command,
)
from tests.consensus.harness import GROUP, POLICY, ROUTES, SiteCluster
from tests.rollout.builders import make_plan, waves

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def site(tmp_path, fleet: LocalFleet):
    made = []

    async def make(n: int, timings: RaftTimings | None = None) -> SiteCluster:
        s = SiteCluster(tmp_path / f"site{len(made)}", fleet, n, timings)
        made.append(s)
        await s.open()
        return s

    yield make
    for s in made:
        await s.shutdown()


def fleet_plan(fleet: LocalFleet, rollout_id: str = "mlp-2"):
    from mesh.identity.signing import KeyRole, load_signing_key

    publisher = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
    now = time.time()
    plan = make_plan(
        rollout_id,
        created_at=now,
        key=publisher,
        plan_waves=waves(500_000, 1_000_000, soak_s=60),
        autonomous_scope=AutonomousScope(1_000_000),
    )
    return sign_plan(plan, publisher)


async def test_rollout_commands_replicate_beside_decisions_and_are_audited_once(site, fleet):
    s = await site(3, RaftTimings(compaction_min_entries=6))
    groups = s.start_all()
    leader = await s.wait_leader()
    follower = next(g for g in groups if g is not leader)
    signed = fleet_plan(fleet)
    result = await follower.propose_rollout(plan_command(signed, now=time.time()))
    assert result.outcome is Outcome.APPLIED and "registered" in result.message
    # Answered only once its audit records are on disk, as a decision's are (read before anything flushes).
    assert follower._state.durable_index >= follower._state.applied_index
    assert (await leader.set_routes(ROUTES)).outcome.value == "applied"  # decisions go on as before
    start = Start(time.time(), ("node-0", "node-1", "node-2"))
    assert (await leader.propose_rollout(encode_input("mlp-2", start))).outcome is Outcome.APPLIED
    await s.converged()
    for g in groups:
        plan, rollout = g.rollout("mlp-2")
        assert (rollout.state, rollout.wave) == (RolloutState.SOAKING, 1) and g.routes() == ROUTES
        assert g.signed_plan("mlp-2").digest == signed.digest
    with pytest.raises(GroupError, match="not a rollout command"):
        await leader.propose_rollout(b'{"cmd":"expire"}')

    # An operator command with a key no replica trusts is refused and audited on every replica.
    from mesh.identity.signing import KeyRole, SigningKey, load_signing_key

    rogue = SigningKey.generate(KeyRole.OPERATOR)
    abort = sign_command(
        rogue,
        signed.plan,
        CommandAction.ABORT,
        now=time.time(),
        ttl_s=60,
        nonce="rogue-0001",
        reason="forged",
    )
    refused = await leader.propose_rollout(encode_input("mlp-2", OperatorInput(time.time(), abort)))
    assert refused.outcome is Outcome.REFUSED
    await s.converged()
    for g in groups:
        kinds = [(r.kind, r.payload.get("reason")) for r in g.audit_records() if r.kind.startswith("rollout")]
        assert kinds == [
            ("rollout_plan", None),
            ("rollout_started", ""),
            ("rollout_refused", "unknown_key"),
        ], kinds

    # A genuine command sent twice (a client retrying after a lost reply): applied once, then answered
    # "already applied" and audited as repeated on every replica.
    operator = load_signing_key(fleet.directory / "operator.key", KeyRole.OPERATOR)
    approve = sign_command(
        operator, signed.plan, CommandAction.APPROVE, now=time.time(), ttl_s=60, nonce="retry-0001", wave=2
    )
    data = encode_input("mlp-2", OperatorInput(time.time(), approve))
    assert (await follower.propose_rollout(data)).outcome is Outcome.APPLIED
    again = await follower.propose_rollout(encode_input("mlp-2", OperatorInput(time.time(), approve)))
    assert again.outcome is Outcome.NOOP and "was already applied in this site" in again.message, again
    await s.converged()
    for g in groups:
        kinds = [r.kind for r in g.audit_records() if r.kind.startswith("rollout")]
        assert kinds[3:] == ["rollout_approved", "rollout_command_repeated"], kinds

    # Enough entries to compact: a member restarted from its own snapshot holds both ledgers again, and
    # its audit log has no duplicate.
    for _ in range(6):
        await leader.propose_rollout(encode_input("mlp-2", Start(time.time(), ("node-0",))))  # noops
    await wait_for(lambda: (leader.data_dir / "raft.snapshot").exists(), 10.0, "a snapshot")
    digest = leader.state_digest()
    await follower.close()
    restarted = s.start(int(follower.node_id.split("-")[1]))
    await s.converged()
    assert restarted.state_digest() == digest and restarted.rollout("mlp-2")[1].state is RolloutState.SOAKING
    keys = [(r.payload["raft_index"], r.payload["raft_event"]) for r in restarted.audit_records()]
    assert len(keys) == len(set(keys)) and restarted.verify_audit().ok


async def test_a_snapshot_written_before_rollouts_existed_still_restores(tmp_path, fleet):
    from mesh.identity.ca import load_trusted_keys

    trusted = load_trusted_keys(fleet.node_credentials("node-0").directory)
    decisions = DecisionLedger(group=GROUP, policy=POLICY, group_size=3, trusted=trusted)
    old = _SNAPSHOT_MAGIC_V1 + (7).to_bytes(8, "big") + (0).to_bytes(2, "big") + decisions.snapshot()
    rollouts = RolloutLedger(site=GROUP, trusted=trusted)
    rollouts.apply(plan_command(fleet_plan(fleet), now=time.time()))
    state = _AuditedLedger(
        DecisionLedger(group=GROUP, policy=POLICY, group_size=3, trusted=trusted),
        rollouts,
        AuditLog(tmp_path / "audit.log"),
        (7, 0),
    )
    state.restore(old)
    assert state.rollouts.rollouts() == ()  # an old snapshot holds no rollouts
    new = state.snapshot()
    with pytest.raises(GroupError, match="truncated"):
        state.restore(new[: len(new) // 3])
    state.restore(new)
    assert state.snapshot() == new


async def test_the_sites_guard_narrows_a_plans_autonomous_scope(site, fleet):
    """[guard] rollout_max_share = 0.05 holds a 50% wave that the plan itself (scope 100%) lets start."""
    s = await site(3)
    s.policy = dataclasses.replace(POLICY, rollout_max_share=0.05)
    groups = s.start_all()
    leader = await s.wait_leader()
    signed = fleet_plan(fleet)
    assert (await leader.propose_rollout(plan_command(signed, now=time.time()))).outcome is Outcome.APPLIED
    start = Start(time.time(), ("node-0", "node-1", "node-2"))
    assert (await leader.propose_rollout(encode_input("mlp-2", start))).outcome is Outcome.APPLIED
    await s.converged()
    for g in groups:
        _, rollout = g.rollout("mlp-2")
        assert rollout.state is RolloutState.WAITING_APPROVAL and rollout.wave == 0, rollout
        assert "autonomous scope of 5%" in rollout.reason
