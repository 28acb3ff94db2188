"""Membership settings: SWIM timings, Lifeguard, message budgets, and the bounds they imply.

`MembershipConfig` is plain data with validation; every figure that tests,
benchmarks and the simulator call "what the timings imply" (suspicion timeout,
expected detection time, dissemination time) is derived here, so there is one
definition of each.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["FEDERATION_POOL", "SITE_POOL", "MembershipConfig", "lifeguard_suspicion_timeout_s"]

SITE_POOL = ""
"""The default pool: the members of one site (label `site`). Empty so that a
message from a node that predates pools (no `pool` field) lands in it."""

FEDERATION_POOL = "federation"
"""The pool of site representatives (a few members of each site), as Consul's WAN pool."""

_POOL_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")


def lifeguard_suspicion_timeout_s(confirmations: int, expected: int, min_s: float, max_s: float) -> float:
    """Lifeguard's suspicion timeout after `confirmations` independent confirmations
    (memberlist's remainingSuspicionTime, before subtracting the time elapsed).

    It starts at `max_s` and falls with the logarithm of the confirmations,
    reaching `min_s` at `expected` of them: a member that many peers cannot
    reach is declared dead quickly, one that a single (perhaps slow) peer
    accuses has the longest time to refute. With `expected` < 1 there is
    nothing to wait for and the timeout is `min_s`.
    """
    if expected < 1:
        return min_s
    share = math.log(confirmations + 1) / math.log(expected + 1)
    return max(min_s, max_s - share * (max_s - min_s))


@dataclass(frozen=True)
class MembershipConfig:
    """SWIM timings and Lifeguard settings. Defaults follow hashicorp/memberlist's DefaultLANConfig.

    memberlist LAN defaults, for comparison: ProbeInterval 1 s, ProbeTimeout
    500 ms, IndirectChecks 3, GossipInterval 200 ms, GossipNodes 3,
    SuspicionMult 4, SuspicionMaxTimeoutMult 6, AwarenessMaxMultiplier 8,
    RetransmitMult 4, PushPullInterval 30 s, GossipToTheDeadTime 30 s. We keep
    all of them. Differences:

    - The piggyback budget: memberlist caps a UDP packet at 1400 bytes, our
      messages ride gRPC over TCP, so `max_gossip_bytes` is 8 KiB, which lets a
      join storm of a few dozen nodes clear in one round without fragmenting.
    - Push-pull is paged (`max_push_pull_bytes`, 1 MiB, a quarter of gRPC's
      4 MiB message cap): memberlist sends the whole state in one TCP stream,
      which at 10,000 members with full metadata would be ~20 MB.
    - Lifeguard's local health also stretches the direct probe timeout, which
      memberlist leaves alone because waiting longer does not get a UDP packet
      through. Over gRPC a late ack is most often our own loop being late.
    - `pool` names the gossip pool the messages belong to, so that one node
      can serve a site pool and the federation pool on one gRPC service
      (Consul runs its LAN and WAN pools on two ports instead).
    """

    probe_interval_s: float = 1.0
    probe_timeout_s: float = 0.5
    indirect_checks: int = 3
    gossip_interval_s: float = 0.2
    gossip_nodes: int = 3
    suspicion_mult: int = 4
    retransmit_mult: int = 4
    push_pull_interval_s: float = 30.0
    gossip_to_dead_s: float = 30.0
    max_gossip_bytes: int = 8192
    # Lifeguard (Dadgar, Phillips, Currey 2018): local health multiplier, suspicion
    # timeouts that shrink with independent confirmations, early notice to the
    # suspect, nacks from relays. False gives plain SWIM (a bench compares both).
    lifeguard: bool = True
    suspicion_max_timeout_mult: int = 6
    awareness_max_multiplier: int = 8
    max_push_pull_bytes: int = 1 << 20
    pool: str = SITE_POOL
    # The site pool of a fleet in sites mode (`[membership] pools = "sites"`): only members
    # whose `site` label is this node's are admitted; updates about any other node are dropped
    # (counted in `MembershipStats.foreign_dropped`). A node seeded with another site's
    # address, or a member of two pools, cannot fill the site's table with other sites.
    site_only: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.probe_interval_s <= 0:
            problems.append("probe_interval_s must be > 0")
        if not 0 < self.probe_timeout_s < self.probe_interval_s:
            problems.append("probe_timeout_s must be > 0 and < probe_interval_s")
        if self.indirect_checks < 0:
            problems.append("indirect_checks must be >= 0")
        if self.gossip_interval_s <= 0:
            problems.append("gossip_interval_s must be > 0")
        if self.gossip_nodes < 1:
            problems.append("gossip_nodes must be >= 1")
        if self.suspicion_mult < 1:
            problems.append("suspicion_mult must be >= 1")
        if self.retransmit_mult < 1:
            problems.append("retransmit_mult must be >= 1")
        if self.push_pull_interval_s <= 0:
            problems.append("push_pull_interval_s must be > 0")
        if self.max_gossip_bytes < 512:
            problems.append("max_gossip_bytes must be >= 512")
        if self.suspicion_max_timeout_mult < 1:
            problems.append("suspicion_max_timeout_mult must be >= 1")
        if self.awareness_max_multiplier < 1:
            problems.append("awareness_max_multiplier must be >= 1")
        if self.max_push_pull_bytes < 1024:
            problems.append("max_push_pull_bytes must be >= 1024")
        if self.pool != SITE_POOL and not _POOL_NAME.match(self.pool):
            problems.append(f"pool {self.pool[:80]!r} must be empty (the site pool) or 1-63 of [a-z0-9_.-] "
                            "starting with a letter")
        if problems:
            raise ValueError("; ".join(problems))

    # Derived quantities. Everything that tests and benchmarks call "the bound
    # the timings imply" comes from here, so there is one definition of it.

    def suspicion_timeout_s(self, n_members: int) -> float:
        """memberlist: SuspicionMult * max(1, log10(n)) * ProbeInterval.

        Plain SWIM's timeout, and Lifeguard's minimum (reached with
        `suspicion_confirmations_expected` confirmations)."""
        return self.suspicion_mult * max(1.0, math.log10(max(1, n_members))) * self.probe_interval_s

    def suspicion_max_timeout_s(self, n_members: int) -> float:
        """Lifeguard's starting suspicion timeout: SuspicionMaxTimeoutMult times the minimum."""
        return self.suspicion_max_timeout_mult * self.suspicion_timeout_s(n_members)

    def suspicion_confirmations_expected(self, n_members: int) -> int:
        """memberlist's k: SuspicionMult - 2, so the timeout reaches its minimum about
        two probe intervals before plain SWIM's would have fired; 0 when there are not
        that many other members (n minus ourselves and the suspect) to confirm."""
        k = self.suspicion_mult - 2
        return 0 if n_members - 2 < k else max(0, k)

    def retransmit_limit(self, n_members: int) -> int:
        """memberlist: RetransmitMult * ceil(log10(n + 1))."""
        return self.retransmit_mult * math.ceil(math.log10(n_members + 1))

    def dissemination_s(self, n_members: int) -> float:
        """Time for an update to reach everyone by gossip: fan-out `gossip_nodes`
        per round reaches n nodes in about log_fanout(n) rounds; we allow twice
        that plus one round for piggybacking delays."""
        rounds = 2 * math.ceil(math.log(max(2, n_members), max(2, self.gossip_nodes))) + 1
        return rounds * self.gossip_interval_s

    def expected_detection_s(self, n_members: int) -> float:
        """Expected time from a crash to every survivor marking the node dead.

        With n-1 probers each probing one random-order member per interval, the
        first probe of the dead node arrives after about e/(e-1) intervals
        (SWIM paper, section 3.1); the failed probe cycle then takes one
        interval, then the suspicion timeout runs at each node once the
        suspicion reached it. With Lifeguard the timeout is the minimum once
        the expected confirmations arrived, which other probers supply within
        a few intervals, well inside that minimum.
        """
        first_probe = self.probe_interval_s * math.e / (math.e - 1)
        return first_probe + self.probe_interval_s + self.suspicion_timeout_s(n_members) \
            + self.dissemination_s(n_members) / 2

    def detection_bound_s(self, n_members: int) -> float:
        """Worst case from a crash to every survivor marking the node dead.

        Round-robin probing guarantees that each live node probes every other
        member at least once in 2(n-1) - 1 intervals; add the failed probe
        cycle, dissemination of the suspicion and the suspicion timeout. With
        Lifeguard the same bound holds: by then every other member has probed
        the dead one too, so the expected confirmations have arrived and the
        timeout is down to its minimum.
        """
        rounds = max(1, 2 * (n_members - 1) - 1)
        return (rounds + 1) * self.probe_interval_s + self.dissemination_s(n_members) \
            + self.suspicion_timeout_s(n_members)
