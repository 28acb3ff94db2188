"""Membership at fleet scale: how fast a fact reaches every device through site pools
and the federation pool, and how fast a site detects a failure.

Two engines answer the same questions for a `Scenario`:

- `run_cores`: the real membership cores (`mesh.membership.core.Membership`,
  Lifeguard included) on the in-memory network (`mesh.sim.netsim`). Every
  device runs a core in its site pool; the representatives of each site
  (`choose_representatives`, 3 by default) run a second core in the federation
  pool, and bridge the two as a node will: when one of a representative's
  cores learns the new version, it publishes it in both pools. Tractable up to
  about 10^4 devices (every core holds its whole site).
- `run_model`: a model of the same protocol, vectorised over devices, for
  10^5-10^6 devices. It is validated against the cores at 10^3 and 10^4
  devices (`validate`, `mesh sim validate`).

The model. Time moves in steps of a quarter of the gossip interval; each node
has a random gossip phase and a random probe phase, as the cores' staggered
timers. A node that knows the version holds it in its broadcast queue with
`retransmit_limit(pool size)` transmissions, and every message that carries it
spends one, exactly as the core counts them:

- gossip: at its gossip phase, a node with transmissions left sends to
  `gossip_nodes` random members of its pool, one transmission each; the
  receiver learns it, and its reply (which carries the receiver's queue)
  spends one of the receiver's transmissions if it has any;
- probes: at its probe phase every node pings one random member of its pool;
  the ping carries the version if the prober has transmissions left, the ack
  carries it back if the target has;
- push-pull: every `push_pull_interval_s(pool size)` each node exchanges its
  table with one random member (repairs what gossip missed; rare in practice);
- loss: every message (each leg of a ping) is lost with probability `loss`;
- bridging: a representative that learns the version in either pool is a new
  source in both, with full transmissions.

Failure detection in a site (one crashed device, Lifeguard on): each
survivor's round-robin reaches the dead device after a uniformly random number
of probe intervals (0 to n-2), and its probe fails one interval later. Each
failure is an accusation that spreads through the site like the version does
(the first one starts everybody's suspicion, the others confirm it). A node's
timer runs from when its suspicion started, for Lifeguard's timeout given the
confirmations it has heard (memberlist's formula); the first timer to expire
declares the device dead and that verdict spreads like the rest. Detection is
when the last survivor knows.

What neither engine models: CPU and bandwidth (the cores' messages are
instantaneous apart from 5 ms latency), chunk transfers, and members joining or
leaving during the run.
"""

from __future__ import annotations

import math
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mesh.membership.config import FEDERATION_POOL, MembershipConfig, lifeguard_suspicion_timeout_s
from mesh.membership.core import push_pull_interval_s
from mesh.membership.federation import DEFAULT_REPRESENTATIVES, SITE_LABEL, choose_representatives
from mesh.membership.messages import EventKind, MemberEvent, State, Update
from mesh.sim.netsim import Network, SimNode

__all__ = ["MembershipResult", "Scenario", "ValidationRow", "rounds_bound", "run", "run_cores", "run_model",
           "tractable_for_cores", "validate"]

SIM_TIMINGS = MembershipConfig()
"""memberlist's LAN timings (probe 1 s, timeout 0.5 s, gossip 0.2 s x 3), Lifeguard on."""

NEW_VERSION = b"face-detect 1.4"
"""The fact that spreads: the metadata a device publishes when it learns of the version."""

# Largest fleet the cores run by default: each core holds its site's table, so
# memory grows as devices x site size; 10^4 devices in sites of 100 is ~0.5 GB.
CORES_MAX_DEVICES = 10_000
CORES_MAX_TABLE_ENTRIES = 2_000_000

_WARMUP_S = 3.0          # lets each core's own start-up ALIVE drain from the queues
_MODEL_STEPS_PER_ROUND = 16


def rounds_bound(devices: int) -> float:
    """The goal for a fact to reach every device: log2 N + ln N + 5 gossip rounds."""
    return math.log2(devices) + math.log(devices) + 5


def site_sizes(devices: int, sites: int) -> list[int]:
    """Devices per site, as even as possible (the first sites get the remainder)."""
    base, extra = divmod(devices, sites)
    return [base + (1 if j < extra else 0) for j in range(sites)]


@dataclass(frozen=True)
class Scenario:
    devices: int
    sites: int
    loss: float = 0.0
    seed: int = 1
    representatives: int = DEFAULT_REPRESENTATIVES
    detection_trials: int = 3
    # Every device publishes the version once it knows it (its metadata names the
    # newest version it knows), rather than only relaying the publishers' updates.
    republish: bool = True
    config: MembershipConfig = SIM_TIMINGS

    def __post_init__(self) -> None:
        if self.devices < 2:
            raise ValueError(f"devices must be >= 2, not {self.devices}")
        if not 1 <= self.sites <= self.devices // 2:
            raise ValueError(f"sites must be between 1 and devices/2 ({self.devices // 2}), not {self.sites}")
        if not 0 <= self.loss < 0.5:
            raise ValueError(f"loss must be in [0, 0.5), not {self.loss}")
        if self.representatives < 1:
            raise ValueError(f"representatives must be >= 1, not {self.representatives}")

    @property
    def site_size(self) -> int:
        """The largest site: the one detection is measured in."""
        return math.ceil(self.devices / self.sites)


@dataclass
class MembershipResult:
    """What `mesh sim membership` reports. `to_json` is the stable, extensible part."""

    scenario: Scenario
    engine: str                         # "cores" or "model"
    seconds_known_all: float            # from publication until the last device knows
    known_share: list[float]            # share of devices that know, after each gossip round
    federation_share: list[float]       # share of the federation pool that knows, per round
    detection_s: list[float]            # per trial: crash until every survivor in the site knows
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rounds_known_all(self) -> float:
        return self.seconds_known_all / self.scenario.config.gossip_interval_s

    @property
    def detection_expected_s(self) -> float:
        return self.scenario.config.expected_detection_s(self.scenario.site_size)

    @property
    def detection_over_expected(self) -> float:
        return statistics.mean(self.detection_s) / self.detection_expected_s

    def to_json(self) -> dict[str, Any]:
        sc = self.scenario
        data: dict[str, Any] = {
            "devices": sc.devices, "sites": sc.sites, "site_size": sc.site_size, "loss": sc.loss,
            "seed": sc.seed,
            "representatives_per_site": sc.representatives, "republish": sc.republish, "engine": self.engine,
            "rounds_known_all": round(self.rounds_known_all, 2),
            "seconds_known_all": round(self.seconds_known_all, 3),
            "rounds_bound": round(rounds_bound(sc.devices), 2),
            "detection_s": round(statistics.mean(self.detection_s), 3),
            "detection_max_s": round(max(self.detection_s), 3),
            "detection_expected_s": round(self.detection_expected_s, 3),
            "detection_over_expected": round(self.detection_over_expected, 3),
            "wall_s": round(self.wall_s, 2), "peak_rss_mb": round(self.peak_rss_mb, 1),
        }
        data.update(self.extra)
        return data


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tractable_for_cores(scenario: Scenario) -> bool:
    """Whether the real cores fit: every device's core holds its site's table."""
    entries = scenario.devices * scenario.site_size + (scenario.sites * scenario.representatives) ** 2
    return scenario.devices <= CORES_MAX_DEVICES and entries <= CORES_MAX_TABLE_ENTRIES


def run(scenario: Scenario, engine: str = "auto") -> MembershipResult:
    """Run the scenario with the cores when they fit (or when asked), else the model."""
    if engine == "auto":
        engine = "cores" if tractable_for_cores(scenario) else "model"
    if engine == "cores":
        return run_cores(scenario)
    if engine == "model":
        return run_model(scenario)
    raise ValueError(f"engine must be auto, cores or model, not {engine!r}")


# -- the cores ------------------------------------------------------------------------------------


def _device_ids(scenario: Scenario) -> list[list[str]]:
    width = len(str(scenario.sites - 1))
    return [[f"s{j:0{width}d}-d{i:05d}" for i in range(size)]
            for j, size in enumerate(site_sizes(scenario.devices, scenario.sites))]


def _site_name(j: int) -> str:
    return f"site-{j:05d}"


class _CoreFleet:
    """Site pools and the federation pool of real cores on one simulated network."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        config = scenario.config
        self.net = Network(0, seed=scenario.seed, config=config, loss=scenario.loss, record_trace=False,
                           on_events=self._on_events)
        self.known_at: dict[str, float] = {}      # device id -> when it learned the version
        self.fed_known: set[str] = set()
        self.site_core: dict[str, SimNode] = {}
        self.fed_core: dict[str, SimNode] = {}
        self.representatives: list[tuple[str, ...]] = []
        federation: list[Update] = []
        for j, ids in enumerate(_device_ids(scenario)):
            labels = ((SITE_LABEL, _site_name(j)),)
            site = [Update(node_id, f"{node_id}:1", 0, State.ALIVE, labels) for node_id in ids]
            for update in site:
                self.site_core[update.node_id] = self.net.add_node(update.node_id, labels=labels, known=site)
            reps = choose_representatives(site, _site_name(j), (), scenario.representatives)
            self.representatives.append(reps)
            federation += [Update(node_id, f"{node_id}:2", 0, State.ALIVE, labels) for node_id in reps]
        fed_config = replace(config, pool=FEDERATION_POOL)
        for update in federation:
            self.fed_core[update.node_id] = self.net.add_node(
                update.node_id, name=f"{update.node_id}/{FEDERATION_POOL}", address=update.address,
                config=fed_config, labels=update.labels, known=federation)

    def publish(self, device: str) -> None:
        """`device` publishes the new version (in its site pool)."""
        self.site_core[device].core.set_meta(NEW_VERSION)
        self._learn(device)

    def _on_events(self, node: SimNode, events: list[MemberEvent]) -> None:
        for event in events:
            if event.kind is EventKind.META:
                seen = node.core.member(event.node_id)
                if seen is not None and seen.meta == NEW_VERSION:
                    self._learn(node.node_id)
                    return

    def _learn(self, device: str) -> None:
        """`device` knows the version. A representative bridges its two cores, as a node
        will: it publishes the version in the federation pool and in its site pool."""
        if device not in self.known_at:
            self.known_at[device] = self.net.now
            if self.scenario.republish:
                self.site_core[device].core.set_meta(NEW_VERSION)
        fed = self.fed_core.get(device)
        if fed is not None and device not in self.fed_known:
            self.fed_known.add(device)
            fed.core.set_meta(NEW_VERSION)
            self.site_core[device].core.set_meta(NEW_VERSION)


def run_cores(scenario: Scenario) -> MembershipResult:
    """The real membership cores on the simulated network (see the module docstring)."""
    started = time.perf_counter()
    config = scenario.config
    fleet = _CoreFleet(scenario)
    fleet.net.run_for(_WARMUP_S)
    rng = random.Random(f"{scenario.seed}:origin")
    first_site = _device_ids(scenario)[0]
    origin = rng.choice([d for d in first_site if d not in fleet.representatives[0]] or first_site)
    t0 = fleet.net.now
    fleet.publish(origin)
    known_share, federation_share = [], []
    n_fed = len(fleet.fed_core)
    give_up_s = 20 * rounds_bound(scenario.devices) * config.gossip_interval_s + 2 * push_pull_interval_s(
        config, scenario.site_size)
    while len(fleet.known_at) < scenario.devices and fleet.net.now - t0 < give_up_s:
        fleet.net.run_for(config.gossip_interval_s)
        known_share.append(len(fleet.known_at) / scenario.devices)
        federation_share.append(len(fleet.fed_known) / n_fed)
    if len(fleet.known_at) < scenario.devices:
        raise RuntimeError(f"seed {scenario.seed}: {scenario.devices - len(fleet.known_at)} devices never "
                           f"learned the version within {give_up_s:.0f} s")
    seconds = max(fleet.known_at.values()) - t0
    messages = fleet.net.stats.messages_sent
    del fleet
    detection = [_detect_with_cores(scenario, trial) for trial in range(scenario.detection_trials)]
    return MembershipResult(scenario, "cores", seconds, known_share, federation_share, detection,
                            wall_s=time.perf_counter() - started, peak_rss_mb=peak_rss_mb(),
                            extra={"messages": messages})


def _detect_with_cores(scenario: Scenario, trial: int) -> float:
    """Crash one device of a site of `site_size` cores; seconds until every survivor knows."""
    config, n = scenario.config, scenario.site_size
    seen_dead: set[str] = set()
    victim = f"d{(trial * 7919) % n:05d}"

    def on_events(node: SimNode, events: list[MemberEvent]) -> None:
        if any(e.kind is EventKind.DEAD and e.node_id == victim for e in events):
            seen_dead.add(node.name)

    net = Network(0, seed=scenario.seed * 1000 + trial, config=config, loss=scenario.loss, record_trace=False,
                  on_events=on_events)
    labels = ((SITE_LABEL, _site_name(0)),)
    site = [Update(f"d{i:05d}", f"d{i:05d}:1", 0, State.ALIVE, labels) for i in range(n)]
    for update in site:
        net.add_node(update.node_id, labels=labels, known=site)
    net.run_for(_WARMUP_S + random.Random(f"{scenario.seed}:{trial}").uniform(0, config.probe_interval_s))
    crashed_at = net.now
    net.crash(victim)
    took = net.run_until(lambda: len(seen_dead) == n - 1, timeout_s=3 * config.detection_bound_s(n),
                         check_every_s=config.gossip_interval_s / 4)
    if took is None:
        raise RuntimeError(f"seed {scenario.seed} trial {trial}: {victim} not dead everywhere within "
                           f"{3 * config.detection_bound_s(n):.0f} s")
    return net.now - crashed_at


# -- the model --------------------------------------------------------------------------------------


class _Pools:
    """Nodes in pools, for the model: node i belongs to the pool starting at `start[i]` of `size[i]`.

    What a node knows is a set of publications of the version (a bit each: the
    origin's, each representative's); a message carries the sender's set, and a
    receiver that finds a publication it lacked re-queues with full
    transmissions, as a core does for each update it had not seen. In the
    federation pool every representative publishes, so a message from a node
    that knows brings something new while the epidemic lasts: there, any
    message that carries the version renews the receiver's transmissions.
    """

    def __init__(self, pool_sizes: list[int], config: MembershipConfig, loss: float, rng: np.random.Generator,
                 renew_always: list[bool] | None = None):
        self.config, self.loss, self.rng = config, loss, rng
        sizes = np.asarray(pool_sizes, dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        self.n = int(sizes.sum())
        self.pool_of = np.repeat(np.arange(len(sizes)), sizes)
        self.start = starts[self.pool_of]
        self.size = sizes[self.pool_of]
        self.local = np.arange(self.n) - self.start
        limits = np.array([config.retransmit_limit(int(s)) for s in sizes], dtype=np.int32)
        self.limit = limits[self.pool_of]
        self.renew_always = np.asarray(renew_always or [False] * len(sizes))[self.pool_of]
        self.step_s = config.gossip_interval_s / _MODEL_STEPS_PER_ROUND
        self.probe_steps = max(1, round(config.probe_interval_s / self.step_s))
        self.gossip_phase = rng.integers(0, _MODEL_STEPS_PER_ROUND, self.n)
        self.probe_phase = rng.integers(0, self.probe_steps, self.n)
        pp_steps = np.array([max(1, round(push_pull_interval_s(config, int(s)) / self.step_s))
                             for s in sizes])
        self.push_pull_steps = pp_steps[self.pool_of]
        self.push_pull_phase = (rng.random(self.n) * self.push_pull_steps).astype(np.int64)
        self.mask = np.zeros(self.n, dtype=np.uint64)
        self.known_at = np.full(self.n, np.inf)
        self.budget = np.zeros(self.n, dtype=np.int32)
        self.alive = np.ones(self.n, dtype=bool)

    @property
    def known(self) -> np.ndarray:
        return self.mask != 0

    def peers(self, nodes: np.ndarray) -> np.ndarray:
        """One random other member of each node's pool."""
        size = self.size[nodes]
        offset = self.rng.integers(1, np.maximum(size, 2))
        return self.start[nodes] + (self.local[nodes] + offset) % size

    def receive(self, receivers: np.ndarray, masks: np.ndarray, now: float) -> np.ndarray:
        """Deliver messages carrying `masks`; returns the receivers that knew nothing before."""
        keep = self.alive[receivers] & (masks != 0)
        receivers, masks = receivers[keep], masks[keep]
        if not receivers.size:
            return receivers
        touched = np.unique(receivers)
        before = self.mask[touched].copy()
        np.bitwise_or.at(self.mask, receivers, masks)
        renewed = touched[(self.mask[touched] != before) | self.renew_always[touched]]
        self.budget[renewed] = self.limit[renewed]
        new = touched[(before == 0) & (self.mask[touched] != 0)]
        self.known_at[new] = now
        return new

    def publish(self, nodes: np.ndarray, bits: np.ndarray, now: float) -> None:
        """These nodes publish the version themselves (`bits`: their publications): full transmissions."""
        new = nodes[self.mask[nodes] == 0]
        self.known_at[new] = now
        np.bitwise_or.at(self.mask, nodes, bits.astype(np.uint64))
        self.budget[nodes] = self.limit[nodes]

    def _delivered(self, count: int) -> np.ndarray:
        if not self.loss:
            return np.ones(count, dtype=bool)
        return self.rng.random(count) >= self.loss

    def _carried(self, nodes: np.ndarray) -> np.ndarray:
        """What these nodes' messages carry (nothing once their transmissions are spent);
        each message that carries the version spends one transmission."""
        carries = self.budget[nodes] > 0
        masks = np.where(carries, self.mask[nodes], np.uint64(0))
        np.subtract.at(self.budget, nodes[carries], 1)
        np.maximum(self.budget, 0, out=self.budget)
        return masks

    def step(self, s: int, now: float) -> np.ndarray:
        """One step of gossip, probes and push-pull; returns the nodes that learned the version."""
        learned = []
        ready = self.alive & (self.known_at < now)
        # Gossip: up to gossip_nodes messages while transmissions last; each reply
        # carries the receiver's queue back.
        phase = s % _MODEL_STEPS_PER_ROUND
        senders = np.flatnonzero(ready & (self.gossip_phase == phase) & (self.budget > 0))
        if senders.size:
            fanout = np.minimum(self.budget[senders], self.config.gossip_nodes)
            senders = np.repeat(senders, fanout)
            masks = self.mask[senders]
            np.subtract.at(self.budget, senders, 1)
            targets = self.peers(senders)
            reached = self._delivered(targets.size) & self.alive[targets]
            learned.append(self.receive(targets[reached], masks[reached], now))
            replies = self._carried(targets[reached])
            back = self._delivered(replies.size)
            learned.append(self.receive(senders[reached][back], replies[back], now))
        # Probes: every live node pings one member; the ping and the ack piggyback.
        probers = np.flatnonzero(self.alive & (self.probe_phase == s % self.probe_steps))
        if probers.size:
            targets = self.peers(probers)
            pings = self._carried(probers)
            reached = self._delivered(probers.size) & self.alive[targets]
            learned.append(self.receive(targets[reached], pings[reached], now))
            acks = self._carried(targets[reached])
            back = self._delivered(acks.size)
            learned.append(self.receive(probers[reached][back], acks[back], now))
        # Push-pull: a state exchange with one random member, both ways.
        pullers = np.flatnonzero(self.alive & (s % self.push_pull_steps == self.push_pull_phase))
        if pullers.size:
            targets = self.peers(pullers)
            ok = self._delivered(pullers.size) & self._delivered(pullers.size) & self.alive[targets]
            pullers, targets = pullers[ok], targets[ok]
            learned.append(self.receive(targets, self.mask[pullers], now))
            learned.append(self.receive(pullers, self.mask[targets], now))
        return np.concatenate(learned) if learned else np.empty(0, dtype=np.int64)


def run_model(scenario: Scenario) -> MembershipResult:
    """The vectorised model of the same protocol (see the module docstring)."""
    started = time.perf_counter()
    config = scenario.config
    rng = np.random.default_rng(scenario.seed)
    sizes = site_sizes(scenario.devices, scenario.sites)
    reps_per_site = [min(scenario.representatives, s) for s in sizes]
    n_fed = sum(reps_per_site)
    pools = _Pools(sizes + [n_fed], config, scenario.loss, rng,
                   renew_always=[scenario.republish] * len(sizes) + [True])
    devices = scenario.devices
    # Representatives: the first devices of each site (any k of them; the model is symmetric).
    site_starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rep_device = np.concatenate([site_starts[j] + np.arange(k) for j, k in enumerate(reps_per_site)])
    rep_rank = np.concatenate([np.arange(k) for k in reps_per_site])
    fed_node = devices + np.arange(n_fed)
    device_to_fed = np.full(devices, -1)
    device_to_fed[rep_device] = fed_node
    origin = int(rng.integers(reps_per_site[0], sizes[0])) if sizes[0] > reps_per_site[0] else 0

    bridged = np.zeros(n_fed, dtype=bool)

    def bridge(new: np.ndarray, now: float) -> None:
        # A representative that learns in either pool publishes in both, once.
        reps = np.concatenate((device_to_fed[new[new < devices]], new[new >= devices]))
        reps = np.unique(reps[reps >= 0])
        reps = reps[~bridged[reps - devices]]
        if reps.size:
            bridged[reps - devices] = True
            # Publication bits: the origin's is bit 0, the i-th representative's of a site bit i + 1.
            bits = np.left_shift(np.uint64(1), (rep_rank[reps - devices] + 1).astype(np.uint64))
            pools.publish(np.concatenate((rep_device[reps - devices], reps)), np.concatenate((bits, bits)),
                          now)

    pools.publish(np.array([origin]), np.array([1], dtype=np.uint64), 0.0)
    bridge(np.array([origin]), 0.0)
    known_share, federation_share = [], []
    give_up_steps = (int(20 * rounds_bound(devices) * _MODEL_STEPS_PER_ROUND)
                     + 2 * int(pools.push_pull_steps.max()))
    s = 0
    while not pools.known[:devices].all():
        s += 1
        if s > give_up_steps:
            raise RuntimeError(f"seed {scenario.seed}: the model did not reach every device")
        now = s * pools.step_s
        bridge(pools.step(s, now), now)
        if s % _MODEL_STEPS_PER_ROUND == 0:
            known_share.append(float(pools.known[:devices].mean()))
            federation_share.append(float(pools.known[devices:].mean()))
    known_share.append(1.0)
    federation_share.append(float(pools.known[devices:].mean()))
    seconds = float(pools.known_at[:devices].max())
    detection = [_detect_with_model(scenario, trial) for trial in range(scenario.detection_trials)]
    return MembershipResult(scenario, "model", seconds, known_share, federation_share, detection,
                            wall_s=time.perf_counter() - started, peak_rss_mb=peak_rss_mb())


def _spread(n: int, source: int, start_s: float, config: MembershipConfig, loss: float, dead: int,
            rng: np.random.Generator) -> np.ndarray:
    """Seconds at which each member of one pool of n (one of them `dead`) hears a rumour
    that `source` starts at `start_s` (inf: never)."""
    pools = _Pools([n], config, loss, rng)
    pools.alive[dead] = False
    pools.publish(np.array([source]), np.array([1], dtype=np.uint64), 0.0)
    steps = int(40 * rounds_bound(n) * _MODEL_STEPS_PER_ROUND)
    for s in range(1, steps):
        pools.step(s, s * pools.step_s)
        if pools.known[pools.alive].all():
            break
    return start_s + pools.known_at


def _detect_with_model(scenario: Scenario, trial: int) -> float:
    """Lifeguard's failure detection in a site of `site_size`, as in the module docstring."""
    config, n = scenario.config, scenario.site_size
    rng = np.random.default_rng([scenario.seed, trial, 7])
    interval = config.probe_interval_s
    dead = 0
    # When each survivor's round-robin reaches the dead device: its probe phase, then
    # a uniformly random number of whole intervals; the probe fails an interval later.
    probe_at = rng.random(n) * interval + rng.integers(0, max(1, n - 1), n) * interval
    fails_at = probe_at + interval
    fails_at[dead] = np.inf
    accusers = np.argsort(fails_at)[: config.suspicion_confirmations_expected(n) + 4]
    accusers = accusers[np.isfinite(fails_at[accusers])]
    # hears[a, x]: when x hears accuser a (its own failure counts when it is the accuser).
    hears = np.vstack([_spread(n, int(a), float(fails_at[a]), config, scenario.loss, dead, rng)
                       for a in accusers])
    min_s, max_s = config.suspicion_timeout_s(n), config.suspicion_max_timeout_s(n)
    expected = config.suspicion_confirmations_expected(n) if config.lifeguard else 0
    if not config.lifeguard:
        max_s = min_s
    expires = np.full(n, np.inf)
    for x in range(n):
        if x == dead:
            continue
        times = np.sort(hears[:, x])
        times = times[np.isfinite(times)]
        if not times.size:
            continue
        start, deadline = times[0], times[0] + max_s
        for confirmed, heard in enumerate(times[1:expected + 1], start=1):
            if heard >= deadline:
                break
            deadline = max(start + lifeguard_suspicion_timeout_s(confirmed, expected, min_s, max_s), heard)
        expires[x] = deadline
    first = int(np.argmin(expires))
    verdict = _spread(n, first, float(expires[first]), config, scenario.loss, dead, rng)
    knows = np.minimum(expires, verdict)
    knows[dead] = -np.inf
    return float(knows.max())


# -- validation ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationRow:
    devices: int
    sites: int
    cores_rounds: float
    model_rounds: float
    cores_detection_s: float
    model_detection_s: float
    cores_wall_s: float
    model_wall_s: float

    @property
    def rounds_error(self) -> float:
        return self.model_rounds / self.cores_rounds - 1

    @property
    def detection_error(self) -> float:
        return self.model_detection_s / self.cores_detection_s - 1

    def to_json(self) -> dict[str, Any]:
        return {"devices": self.devices, "sites": self.sites,
                "cores_rounds_known_all": round(self.cores_rounds, 2),
                "model_rounds_known_all": round(self.model_rounds, 2),
                "rounds_error": round(self.rounds_error, 3),
                "cores_detection_s": round(self.cores_detection_s, 3),
                "model_detection_s": round(self.model_detection_s, 3),
                "detection_error": round(self.detection_error, 3),
                "cores_wall_s": round(self.cores_wall_s, 1), "model_wall_s": round(self.model_wall_s, 1)}


def validate(devices: int, sites: int, seeds: list[int], *, loss: float = 0.0, detection_trials: int = 3,
             progress: Callable[[str], None] | None = None) -> ValidationRow:
    """Cores and model on the same scenario over several seeds: mean rounds until every
    device knows, and mean detection time in a site."""
    results: dict[str, list[MembershipResult]] = {"cores": [], "model": []}
    for seed in seeds:
        scenario = Scenario(devices, sites, loss=loss, seed=seed, detection_trials=detection_trials)
        for engine in ("cores", "model"):
            if progress:
                progress(f"{devices} devices, {sites} sites, seed {seed}: {engine}")
            results[engine].append(run(scenario, engine))

    def mean(engine: str, value: Callable[[MembershipResult], float]) -> float:
        return statistics.mean(value(r) for r in results[engine])

    return ValidationRow(devices, sites,
                         mean("cores", lambda r: r.rounds_known_all),
                         mean("model", lambda r: r.rounds_known_all),
                         mean("cores", lambda r: statistics.mean(r.detection_s)),
                         mean("model", lambda r: statistics.mean(r.detection_s)),
                         mean("cores", lambda r: r.wall_s), mean("model", lambda r: r.wall_s))
