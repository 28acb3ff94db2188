"""The scenarios: a cluster plan, a seeded schedule of nemeses, and a workload.

A schedule is a list of steps (start after the fault phase begins, duration, nemesis).
`steps(rng)` builds it from the run's seeded rng, so `--seed` replays the same schedule
with the same random choices; which node leads when a leader nemesis strikes depends on
the run, and is recorded.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from chaos.cluster import ClusterPlan
from chaos.nemesis import (
    Bandwidth,
    ClockJump,
    ClockSkew,
    Corrupt,
    DiskFull,
    Flapping,
    Kill,
    Latency,
    Nemesis,
    NoFault,
    PacketLoss,
    Partition,
    Pause,
    Restart,
)
from chaos.workload import WorkloadSpec

Step = tuple[float, float, Nemesis]


@dataclass
class Scenario:
    name: str
    description: str
    plan: Callable[[], ClusterPlan]
    steps: Callable[[random.Random], list[Step]]
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    warmup_s: float = 4.0
    after_heal_s: float = 6.0  # workload keeps running this long after the last heal
    settle_timeout_s: float = 60.0
    measure_heal: bool = False  # issue 14's heal figures (time to current reads, false deaths)
    model_family: str = "wake"  # chaos.cluster.model_files: "mlp-bad" publishes a bad version 2


def _nine() -> ClusterPlan:
    return ClusterPlan.sites(9, 3)


def _five() -> ClusterPlan:
    return ClusterPlan.sites(5, 1)


def _one(nemesis: Callable[[], Nemesis], duration_s: float = 15.0, start_s: float = 0.0) -> Callable:
    return lambda rng: [(start_s, duration_s, nemesis())]


def _mixed(rng: random.Random) -> list[Step]:
    """Three faults drawn from the seed, one after the other."""
    menu: list[Callable[[], Nemesis]] = [
        lambda: Partition("one"),
        lambda: Partition("halves"),
        lambda: Partition("leader"),
        lambda: Partition("site"),
        lambda: Partition("asymmetric"),
        lambda: Kill("one"),
        lambda: Kill("leader"),
        lambda: Pause("one"),
        lambda: PacketLoss(30),
        lambda: Restart("one"),
    ]
    steps, at = [], 0.0
    for _ in range(3):
        duration = rng.choice((8.0, 12.0))
        steps.append((at, duration, rng.choice(menu)()))
        at += duration + 3.0
    return steps


SCENARIOS: dict[str, Scenario] = {}


def _add(scenario: Scenario) -> None:
    SCENARIOS[scenario.name] = scenario


_add(
    Scenario(
        "smoke",
        "5 nodes in one site: one node isolated for 8 s, then one node SIGKILLed and restarted",
        _five,
        lambda rng: [(0.0, 8.0, Partition("one")), (11.0, 6.0, Kill("one"))],
        WorkloadSpec(publish_at_s=2.0),
        warmup_s=3.0,
        after_heal_s=4.0,
        settle_timeout_s=45.0,
    )
)
_add(
    Scenario(
        "partition-one",
        "9 nodes in 3 sites: one random node isolated for 15 s",
        _nine,
        _one(lambda: Partition("one")),
    )
)
_add(
    Scenario(
        "partition-halves",
        "9 nodes in 3 sites: random halves across sites for 15 s",
        _nine,
        _one(lambda: Partition("halves")),
    )
)
_add(
    Scenario(
        "partition-leader",
        "9 nodes in 3 sites: a site's Raft leader isolated for 15 s",
        _nine,
        _one(lambda: Partition("leader")),
    )
)
_add(
    Scenario(
        "partition-leader-minority",
        "5 nodes in one site: split 2|3 with the leader on the 2 side, 15 s",
        _five,
        _one(lambda: Partition("leader-minority")),
    )
)
_add(
    Scenario(
        "partition-ring",
        "5 nodes in one site: majorities ring for 15 s",
        _five,
        _one(lambda: Partition("majorities-ring")),
    )
)
_add(
    Scenario(
        "partition-bridge",
        "5 nodes in one site: two halves joined by one bridge node, 15 s",
        _five,
        _one(lambda: Partition("bridge")),
    )
)
_add(
    Scenario(
        "partition-site",
        "9 nodes in 3 sites: one whole site cut off from the others for 15 s",
        _nine,
        _one(lambda: Partition("site")),
    )
)
_add(
    Scenario(
        "partition-asymmetric",
        "9 nodes in 3 sites: one node stops hearing the others for 15 s",
        _nine,
        _one(lambda: Partition("asymmetric")),
    )
)
_add(
    Scenario(
        "flapping",
        "9 nodes in 3 sites: random halves switched on and off every 3 s for 18 s",
        _nine,
        _one(lambda: Flapping(Partition("halves"), 3.0), 18.0),
    )
)
_add(
    Scenario(
        "packet-loss",
        "9 nodes in 3 sites: 30% of one node's packets dropped for 15 s, then 10% everywhere for 10 s",
        _nine,
        lambda rng: [(0.0, 15.0, PacketLoss(30)), (18.0, 10.0, PacketLoss(10, everywhere=True))],
    )
)
_add(
    Scenario(
        "bandwidth",
        "9 nodes in 3 sites: one link limited to 128 kbit/s while a version is published",
        _nine,
        _one(lambda: Bandwidth(128), 20.0),
        WorkloadSpec(publish_at_s=2.0),
    )
)
_add(
    Scenario(
        "latency",
        "9 nodes in 3 sites: 300 ms each way in front of one node's ports for 15 s",
        lambda: ClusterPlan.sites(9, 3, delay_nodes=frozenset({"n02", "n05"})),
        _one(lambda: Latency(300)),
    )
)
_add(
    Scenario(
        "kill-leader",
        "9 nodes in 3 sites: a site's Raft leader SIGKILLed, restarted after 10 s",
        _nine,
        _one(lambda: Kill("leader"), 10.0),
    )
)
_add(
    Scenario(
        "kill-quorum",
        "5 nodes in one site: 3 of 5 SIGKILLed, restarted after 10 s",
        _five,
        _one(lambda: Kill("quorum"), 10.0),
    )
)
_add(
    Scenario(
        "kill-site",
        "9 nodes in 3 sites: every node of one site SIGKILLed, restarted after 10 s",
        _nine,
        _one(lambda: Kill("site"), 10.0),
    )
)
_add(
    Scenario(
        "pause",
        "9 nodes in 3 sites: one node SIGSTOPped for 10 s (longer than the suspicion timeout), "
        "then the leader of a site for 5 s",
        _nine,
        lambda rng: [(0.0, 10.0, Pause("one")), (13.0, 5.0, Pause("leader"))],
    )
)
_add(
    Scenario(
        "restart",
        "9 nodes in 3 sites: one node SIGTERMed and restarted, then a leader SIGKILLed and restarted",
        _nine,
        lambda rng: [(0.0, 1.0, Restart("one", graceful=True)), (8.0, 1.0, Restart("leader"))],
    )
)
_add(
    Scenario(
        "clock-skew",
        "5 nodes in one site under libfaketime: one restarted 90 s ahead for 15 s, then one 60 s behind",
        lambda: ClusterPlan.sites(5, 1, faketime_nodes=frozenset({"n01", "n02", "n03", "n04", "n05"})),
        lambda rng: [(0.0, 15.0, ClockSkew(90.0)), (20.0, 12.0, ClockSkew(-60.0))],
    )
)
_add(
    Scenario(
        "clock-jump",
        "5 nodes in one site under libfaketime: one node's clocks jump 30 s ahead while it runs, and back",
        lambda: ClusterPlan.sites(5, 1, faketime_nodes=frozenset({"n01", "n02", "n03", "n04", "n05"})),
        _one(lambda: ClockJump(30.0), 12.0),
    )
)
_add(
    Scenario(
        "disk-full",
        "9 nodes in 3 sites, one data dir per site on a 64 MB tmpfs: one fills up for 15 s while a "
        "version is published",
        lambda: ClusterPlan.sites(9, 3, tmpfs_mb={f"n{i:02d}": 64 for i in (1, 4, 7)}),
        _one(lambda: DiskFull()),
        WorkloadSpec(publish_at_s=3.0),
    )
)
_add(
    Scenario(
        "corrupt-chunk",
        "9 nodes in 3 sites: a bit flipped in one node's stored model, then a new "
        "version published and a rogue one (signed outside the fleet)",
        _nine,
        lambda rng: [(0.0, 1.0, Corrupt("chunk", "bitflip")), (4.0, 1.0, Corrupt("chunk", "truncate"))],
        WorkloadSpec(publish_at_s=6.0, rogue_publish_at_s=8.0),
        after_heal_s=12.0,
    )
)
_add(
    Scenario(
        "corrupt-audit",
        "5 nodes in one site: one node's audit log bit-flipped, another's truncated; both must be detected",
        _five,
        lambda rng: [(4.0, 1.0, Corrupt("audit", "bitflip")), (8.0, 1.0, Corrupt("audit", "truncate"))],
    )
)
_add(
    Scenario(
        "rollout-bad",
        "9 nodes in 3 sites: a bad version (NaN on half the inputs) rolled out while a site's Raft "
        "leader is isolated for 12 s; every site must roll it back by itself",
        _nine,
        lambda rng: [(3.0, 12.0, Partition("leader"))],
        WorkloadSpec(publish_at_s=1.0),
        model_family="mlp-bad",
    )
)
_add(Scenario("mixed", "9 nodes in 3 sites: three faults drawn from the seed", _nine, _mixed))
_add(
    Scenario(
        "heal-leader-minority",
        "issue 14: 5 nodes in one site, split 2|3 with the Raft leader on the 2 "
        "side for 40 s, healed; measures time until every replica serves current reads and false deaths "
        "in the 20 s after the heal",
        _five,
        _one(lambda: Partition("leader-minority"), 40.0),
        WorkloadSpec(publish_at_s=None),
        warmup_s=5.0,
        after_heal_s=20.0,
        measure_heal=True,
    )
)

_add(
    Scenario(
        "heal-control",
        "control run for heal-leader-minority: the same 5 nodes, workload and measurements, no partition",
        _five,
        _one(lambda: NoFault(), 40.0),
        WorkloadSpec(publish_at_s=None),
        warmup_s=5.0,
        after_heal_s=20.0,
        measure_heal=True,
    )
)

_add(
    Scenario(
        "negative-unguarded",
        "5 nodes in one site running a broken build whose guard allows every decision, no fault: "
        "guard_scope must fail (a negative, not in the matrix)",
        lambda: ClusterPlan.sites(5, 1, sabotage="unguarded"),
        lambda rng: [],
        WorkloadSpec(publish_at_s=None, rollout=False, move_interval_s=1.0, bulk_every=2),
        warmup_s=3.0,
        after_heal_s=8.0,
        settle_timeout_s=45.0,
    )
)

# Runs that must fail a checker: each proves, on real nodes, that its checker can fail.
NEGATIVES = ("negative-unguarded",)
# `make chaos`: every nemesis at least once.
MATRIX = [name for name in SCENARIOS if name not in ("heal-leader-minority", "heal-control", *NEGATIVES)]


def family(kind: str) -> str:
    """A nemesis kind's family: "partition-leader" -> "partition", "clock-skew" -> "clock"."""
    return kind.split("-", 1)[0]


def families(scenario: Scenario, seed: int) -> set[str]:
    """The nemesis families a scenario injects under a seed (`mixed` draws them from the seed)."""
    return {family(n.kind) for _, _, n in steps_for(scenario, seed)} - {"no"}


def rotated_plan(
    scenarios: list[Scenario], seeds: list[int], per_family: int = 2
) -> list[tuple[Scenario, int]]:
    """Runs covering several seeds at the cost of about one: scenario i runs under seeds[i mod n];
    then, while a nemesis family has met fewer than `per_family` seeds (at most n), the first
    scenario that injects it runs again under its next seed. Deterministic: the same arguments
    always plan the same runs, in scenario order."""
    if not seeds:
        raise ValueError("no seeds")
    want = min(per_family, len(set(seeds)))
    runs: list[tuple[Scenario, int]] = []
    met: dict[str, set[int]] = {}
    first = {s.name: i for i, s in enumerate(scenarios)}
    turn = dict(first)  # each scenario's next seed index: its own rotation through the list

    def run(scenario: Scenario) -> None:
        seed = seeds[turn[scenario.name] % len(seeds)]
        turn[scenario.name] += 1
        runs.append((scenario, seed))
        for fam in families(scenario, seed):
            met.setdefault(fam, set()).add(seed)

    for scenario in scenarios:
        run(scenario)
    stuck: set[str] = set()  # families no scenario can show another seed
    while short := [f for f, seen in met.items() if len(seen) < want and f not in stuck]:
        fam = short[0]
        nexts = [s for s in scenarios if turn[s.name] - first[s.name] < len(seeds)]
        candidates = [
            s
            for s in nexts
            if fam in families(s, seeds[turn[s.name] % len(seeds)])
            and seeds[turn[s.name] % len(seeds)] not in met[fam]
        ]
        if candidates:
            run(candidates[0])
        else:
            stuck.add(fam)
    runs.sort(key=lambda r: scenarios.index(r[0]))
    return runs


def steps_for(scenario: Scenario, seed: int) -> list[Step]:
    """The schedule of a scenario under a seed, each nemesis keyed uniquely and given its own draws."""
    steps = scenario.steps(random.Random(f"{seed}/schedule"))
    for i, (_, _, nemesis) in enumerate(steps):
        nemesis.key = f"{i}-{nemesis.kind}"
        nemesis.rng = random.Random(f"{seed}/nemesis/{nemesis.key}")
    return steps
