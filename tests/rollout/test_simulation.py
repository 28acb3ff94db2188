"""A pure fleet rollout simulation: 1,000 simulated devices in sites, each site's leader running the gate
and proposing to its ledger (as command bytes, on two replicas), each device serving what
`desired_version` says. No clock, no network: time is a tick counter, randomness a seeded Random.

It shows the two promises of issue 8 on the cores alone: a bad version (20% errors) touches no device
beyond the first wave, and a good one completes, its 100% wave held until an operator approves it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from mesh.inference.counts import LATENCY_BUCKETS_S
from mesh.rollout.cohort import site_wave_sizes, wave_size
from mesh.rollout.health import (
    DeviceReport,
    GateOutcome,
    GateVerdict,
    NodeHealth,
    SiteEvidence,
    VersionCounters,
    decode_node_health,
    encode_node_health,
    evaluate_gate,
)
from mesh.rollout.plan import CommandAction, RolloutPlan
from mesh.rollout.state import (
    OperatorInput,
    Outcome,
    RolloutLedger,
    RolloutState,
    desired_version,
    encode_input,
    plan_command,
    proposals,
)
from tests.rollout.builders import T0, TRUSTED, command, device, make_plan, signed, waves

TICK_S = 10.0
REQUESTS_PER_TICK = 5
PLAN = make_plan(plan_waves=waves(10_000, 100_000, 1_000_000, soak_s=60, min_requests=100))


@dataclass
class SimDevice:
    node_id: str
    site: str
    serving: str = "1.0"
    ever_target: bool = False
    # version -> [requests, errors, active_ms]
    counts: dict[str, list[int]] = field(default_factory=dict)

    def serve(self, rng: random.Random, error_p: float) -> tuple[int, int]:
        c = self.counts.setdefault(self.serving, [0, 0, 0])
        errors = sum(rng.random() < error_p for _ in range(REQUESTS_PER_TICK))
        c[0] += REQUESTS_PER_TICK
        c[1] += errors
        c[2] += int(TICK_S * 1000)
        return REQUESTS_PER_TICK, errors

    def health(self, model: str) -> bytes:
        """What the node would gossip: its counters per version, through the real codec."""
        entries = []
        for version, (requests, errors, active_ms) in sorted(self.counts.items()):
            buckets = (requests,) + (0,) * len(LATENCY_BUCKETS_S)
            entries.append(
                VersionCounters(model, version, 1, requests, (errors, 0, 0, 0), active_ms, buckets, requests)
            )
        return encode_node_health(NodeHealth(tuple(entries)))


class Fleet:
    """Sites of simulated devices, one rollout ledger per site on two replicas (leader and follower)."""

    def __init__(self, plan: RolloutPlan, sizes: dict[str, int], *, target_error_p: float, seed: int) -> None:
        self.plan = plan
        self.rng = random.Random(seed)
        self.error_p = {plan.baseline_version: 0.01, plan.target_version: target_error_p}
        self.devices = [SimDevice(f"{site}-dev-{i:04d}", site) for site, n in sizes.items() for i in range(n)]
        self.sites = {site: [d for d in self.devices if d.site == site] for site in sizes}
        self.replicas = {
            s: (RolloutLedger(site=s, trusted=TRUSTED), RolloutLedger(site=s, trusted=TRUSTED)) for s in sizes
        }
        self.evidence: dict[str, SiteEvidence] = {}
        self.verdicts: dict[str, GateVerdict] = {}
        self.now = T0
        self.requests = {plan.baseline_version: 0, plan.target_version: 0}
        self.first_fail_tick: int | None = None
        self.ticks = 0
        self.commit(None, plan_command(signed(plan), now=self.now))

    def commit(self, site: str | None, data: bytes) -> None:
        for s in [site] if site else self.replicas:
            results = [replica.apply(data) for replica in self.replicas[s]]
            assert results[0].outcome is results[1].outcome is not Outcome.REFUSED, results[0].message

    def state(self, site: str):
        return self.replicas[site][0].get(self.plan.rollout_id)[1]

    def tick(self) -> None:
        self.ticks += 1
        self.now += TICK_S
        for d in self.devices:
            requests, _ = d.serve(self.rng, self.error_p[d.serving])
            self.requests[d.serving] += requests
        per_site_eligible = {s: len(members) for s, members in self.sites.items()}
        sizes = site_wave_sizes([w.share_ppm for w in self.plan.waves], per_site_eligible)
        evidence = dict(self.evidence)  # what gossip carried from the last tick
        for site, members in self.sites.items():
            rollout = self.state(site)
            if rollout.state is RolloutState.PENDING:
                for start in proposals(
                    self.plan,
                    rollout,
                    None,
                    self.now,
                    eligible=(d.node_id for d in members),
                    sizes=sizes[site],
                    fleet_eligible=len(self.devices),
                ):
                    self.commit(site, encode_input(self.plan.rollout_id, start))
                continue
            if rollout.state.final:
                continue
            cohort = rollout.cohort(d.node_id for d in members)
            reports = [
                DeviceReport.from_health(
                    d.node_id, True, decode_node_health(d.health(self.plan.model)), self.plan
                )
                for d in members
            ]
            verdict = evaluate_gate(
                self.plan,
                rollout.wave,
                cohort=cohort,
                reports=reports,
                marks=rollout.marks_map(),
                soak_started_at=rollout.soak_started_at,
                now=self.now,
                remote=evidence.values(),
                site=site,
            )
            self.verdicts[site] = verdict
            self.evidence[site] = verdict.evidence(site)
            if verdict.outcome is GateOutcome.FAIL and self.first_fail_tick is None:
                self.first_fail_tick = self.ticks
            for proposal in proposals(self.plan, rollout, verdict, self.now):
                self.commit(site, encode_input(self.plan.rollout_id, proposal))
        for d in self.devices:
            wanted = desired_version(self.plan, self.state(d.site), device(d.node_id), serving=d.serving)
            if wanted.version is not None and wanted.version != d.serving:
                d.serving = wanted.version  # activation: instant here, validated and atomic in the node
            d.ever_target |= d.serving == self.plan.target_version

    def run_until(self, done, max_ticks: int) -> None:
        for _ in range(max_ticks):
            if done():
                return
            self.tick()
        raise AssertionError(
            f"not done after {max_ticks} ticks: "
            f"{ {s: (self.state(s).state.value, self.state(s).wave) for s in self.sites} }"
        )

    def states(self) -> set[RolloutState]:
        return {self.state(s).state for s in self.sites}

    def exposed(self) -> int:
        return sum(d.ever_target for d in self.devices)

    def replicas_agree(self) -> bool:
        return all(a.state_digest() == b.state_digest() for a, b in self.replicas.values())


LAYOUTS = {
    "one site": {"site-a": 1000},
    # site-d is too small for a device in the 1% or 10% waves: it judges by the other sites' evidence.
    "four sites": {"site-a": 600, "site-b": 300, "site-c": 97, "site-d": 3},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("seed", [1, 2])
def test_a_bad_version_rolls_back_with_exposure_within_the_first_wave(layout, seed):
    fleet = Fleet(PLAN, LAYOUTS[layout], target_error_p=0.20, seed=seed)
    fleet.run_until(lambda: fleet.states() == {RolloutState.ABORTED}, max_ticks=60)
    n = len(fleet.devices)
    first_wave = wave_size(PLAN.waves[0].share_ppm, n)
    assert abs(first_wave - n * PLAN.waves[0].share_ppm / 1_000_000) <= 1
    exposed = fleet.exposed()
    bad_request_share = fleet.requests["2.0"] / sum(fleet.requests.values())
    print(
        f"seed={seed} layout={layout}: exposed {exposed}/{n} devices (first wave {first_wave}), "
        f"bad requests {bad_request_share:.4%}, rolled back {fleet.ticks - fleet.first_fail_tick} tick(s) "
        "after the first failing verdict"
    )
    assert 1 <= exposed <= first_wave, f"seed {seed}: {exposed} devices served the bad version"
    assert bad_request_share <= first_wave / n, f"seed {seed}"
    assert all(d.serving == "1.0" for d in fleet.devices), f"seed {seed}: a device still serves the target"
    assert all(
        "gate failed" in fleet.state(s).reason or "aborted" in fleet.state(s).reason for s in fleet.sites
    )
    assert fleet.replicas_agree()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("seed", [1, 2])
def test_a_good_version_completes_and_its_full_wave_waits_for_an_approval(layout, seed):
    fleet = Fleet(PLAN, LAYOUTS[layout], target_error_p=0.01, seed=seed)
    fleet.run_until(lambda: fleet.states() == {RolloutState.WAITING_APPROVAL}, max_ticks=200)
    n = len(fleet.devices)
    second_wave = wave_size(PLAN.waves[1].share_ppm, n)
    # Held: however long nobody approves, no device beyond the 10% wave gets the target.
    for _ in range(10):
        fleet.tick()
    assert fleet.states() == {RolloutState.WAITING_APPROVAL}, f"seed {seed}"
    assert fleet.exposed() <= second_wave, f"seed {seed}: {fleet.exposed()} devices on the target while held"
    assert all("mesh rollout approve okay-nabu-2 --wave 3" in fleet.state(s).reason for s in fleet.sites)
    # One operator approval, verified by each site's own replicas, releases every site.
    approval = command(PLAN, CommandAction.APPROVE, wave=3, now=fleet.now)
    fleet.commit(None, encode_input(PLAN.rollout_id, OperatorInput(fleet.now, approval)))
    assert {fleet.state(s).wave for s in fleet.sites} == {3}
    fleet.run_until(lambda: fleet.states() == {RolloutState.COMPLETED}, max_ticks=100)
    assert all(d.serving == "2.0" for d in fleet.devices), f"seed {seed}"
    assert fleet.replicas_agree()
    # Sent again to any site, the same approval changes nothing and says it was already applied.
    replica = fleet.replicas["site-a"][0]
    before = replica.get(PLAN.rollout_id)
    replay = replica.apply(encode_input(PLAN.rollout_id, OperatorInput(fleet.now, approval)))
    assert replay.outcome is Outcome.NOOP and "was already applied" in replay.message, replay.message
    assert replica.get(PLAN.rollout_id) == before


def test_the_simulation_is_deterministic_under_a_seed():
    runs = []
    for _ in range(2):
        fleet = Fleet(PLAN, LAYOUTS["four sites"], target_error_p=0.2, seed=5)
        for _ in range(12):
            fleet.tick()
        runs.append(([r[0].state_digest() for r in fleet.replicas.values()], fleet.exposed(), fleet.requests))
    assert runs[0] == runs[1]
