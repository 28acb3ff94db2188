"""A fleet for rollouts in one process: real nodes on loopback in sites, each site one Raft group, traffic
against every device, plans and commands signed with the fleet's keys. For tests and bench/rollout.py.

Every node is a full `Node` (mTLS, SWIM, the transfer swarm, LiteRT inference, its site's Raft group,
its rollout shell); they share the event loop. `Traffic` calls Infer on every device at a steady rate
with a chosen share of "bad" inputs (`partly_nan_input`): a good model answers them finitely, the bad
one (`partly_nan_model`) with NaN, so the traffic decides the bad version's error rate.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import random
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from mesh._proto import inference_pb2, inference_pb2_grpc
from mesh.artifacts.manifest import Manifest, SignedManifest
from mesh.artifacts.publish import publish
from mesh.consensus.config import RaftSection
from mesh.consensus.group import GroupError, SiteGroup
from mesh.consensus.raft import RaftError
from mesh.identity.signing import KeyRole, SigningKey, load_signing_key
from mesh.identity.tls import channel_credentials, secure_channel_options
from mesh.inference.fixtures import PARTLY_NAN_LAYERS, partly_nan_input
from mesh.inference.runtime import ModelRuntime
from mesh.membership.config import MembershipConfig
from mesh.membership.messages import State
from mesh.node import runtime as node_runtime
from mesh.node.config import InferenceSection, MembershipSection, NodeConfig, TlsSection
from mesh.node.local import FLEET_TIMINGS, SITES, LocalFleet, wait_for
from mesh.node.rollouts import RolloutSettings, RolloutShell
from mesh.node.runtime import Node
from mesh.rollout.plan import (
    AutonomousScope,
    CommandAction,
    PrefetchPolicy,
    RolloutCommand,
    RolloutPlan,
    Selector,
    SignedPlan,
    SkewRule,
    Wave,
    expiry,
    sign_command,
    sign_plan,
    signature_digest,
)
from mesh.rollout.state import LedgerResult, Outcome, RolloutState, SiteRollout

MODEL = "mlp"
REQUEST_DEADLINE_S = 15.0  # Traffic's deadline per Infer request
# Loopback timings for rollouts: a gate every half second.
FAST_ROLLOUTS = RolloutSettings(
    interval_s=0.5,
    min_step_s=0.1,
    start_grace_s=2.0,
    fetch_timeout_s=1.0,
    sync_timeout_s=15.0,
    # Sites mode: a representative's view stays usable through a few slow polls on a loaded machine.
    fleet_max_age_s=10.0,
)
# Raft with room for scheduling delays too (see FLEET_TIMINGS); a tick thread per node wakes every 0.1 s.
FLEET_RAFT: dict[str, Any] = {
    "election_min_s": 1.0,
    "election_max_s": 2.0,
    "append_period_s": 0.2,
    "leader_fallback_s": 2.0,
    "tick_period_s": 0.1,
}


# Every node of a RolloutFleet is configured with [inference] and [raft], so it has a model runtime,
# a site group and a rollout shell; these say so where the fleet reads them.
def _inference(node: Node) -> ModelRuntime:
    if node.inference is None:
        raise RuntimeError(
            f"{node.config.node_id} has no model runtime: a RolloutFleet node needs [inference]"
        )
    return node.inference


def _group(node: Node) -> SiteGroup:
    if node.group is None:
        raise RuntimeError(f"{node.config.node_id} has no site group: a RolloutFleet node needs [raft]")
    return node.group


def _rollouts(node: Node) -> RolloutShell:
    if node.rollouts is None:
        raise RuntimeError(f"{node.config.node_id} has no rollout shell: a RolloutFleet node needs [raft]")
    return node.rollouts


@dataclass
class NodeTraffic:
    """What one device's traffic saw."""

    requests: int = 0
    failures: int = 0  # RPCs that failed (never expected: a swap must not fail a request)
    cut_by_stop: int = 0  # RPCs in flight when the fleet stopped the device on purpose (not failures)
    by_version: dict[str, list[int]] = field(default_factory=dict)  # version -> [answers, non-finite answers]
    failure_messages: list[str] = field(default_factory=list)


class _LoopWatchdog:
    """A thread that notices the event loop standing still (its `beat` older than 2 s) and keeps where
    the loop's thread stood then, and the longest garbage collection since: enough to tell a blocking
    call on the loop from a process that got no CPU (then this thread, too, wakes late)."""

    def __init__(self, loop_thread: int, threshold_s: float = 2.0) -> None:
        self.beat = time.monotonic()
        self._loop_thread = loop_thread
        self._threshold_s = threshold_s
        self._last = "no stall seen"
        self._gc_started = 0.0
        self._gc_longest_s = 0.0
        self._done = threading.Event()
        gc.callbacks.append(self._gc)
        self._thread = threading.Thread(target=self._run, name="traffic-watchdog", daemon=True)
        self._thread.start()

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.monotonic()
        else:
            self._gc_longest_s = max(self._gc_longest_s, time.monotonic() - self._gc_started)

    def _run(self) -> None:
        woke = time.monotonic()
        while not self._done.wait(0.5):
            now = time.monotonic()
            own_late = now - woke - 0.5
            woke = now
            stalled = now - self.beat
            if stalled > self._threshold_s:
                frame = sys._current_frames().get(self._loop_thread)
                where = (
                    " <- ".join(
                        f"{Path(f.filename).name}:{f.lineno} {f.name}"
                        for f in reversed(traceback.extract_stack(frame)[-4:])
                    )
                    if frame is not None
                    else "?"
                )
                self._last = (
                    f"loop stood still {stalled:.1f} s in {where} (watchdog itself {own_late:.1f} s late; "
                    f"longest GC so far {self._gc_longest_s:.2f} s)"
                )

    def describe(self) -> str:
        return self._last

    def stop(self) -> None:
        self._done.set()
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._gc)


class Traffic:
    """Infer against every running device of `fleet` at `rate_per_node_s`, `bad_share` of inputs bad."""

    def __init__(
        self,
        fleet: RolloutFleet,
        *,
        rate_per_node_s: float = 10.0,
        bad_share: float = 0.3,
        seed: int = 0,
        timeline: bool = False,
    ) -> None:
        """`timeline`: also keep every answer as (monotonic time, node, version, finite), for benchmarks."""
        self.fleet = fleet
        self.timeline: list[tuple[float, str, str, bool]] | None = [] if timeline else None
        self.rate_per_node_s = rate_per_node_s
        self.bad_share = bad_share
        self.stats: dict[str, NodeTraffic] = {}
        self._rng = np.random.default_rng(seed)
        self._tasks: dict[str, asyncio.Task] = {}
        self._started = time.monotonic()
        self._loop_lag_s = 0.0
        self._watchdog: _LoopWatchdog | None = None
        self._creds = channel_credentials(fleet.fleet.node_credentials("camera-app"))

    def start(self) -> None:
        self._started = time.monotonic()
        self._tasks["_loop_lag"] = asyncio.create_task(self._watch_loop(), name="traffic-loop-lag")
        for node_id in self.fleet.nodes:
            self.ensure(node_id)

    async def _watch_loop(self) -> None:
        """Keep `_loop_lag_s`: the longest this event loop was late to wake a 0.1 s sleep, over ~10 s;
        and, with a watchdog thread, what the loop's thread was doing while it stood still."""
        recent: collections.deque[float] = collections.deque(maxlen=100)
        watchdog = _LoopWatchdog(threading.get_ident())
        self._watchdog = watchdog
        try:
            while True:
                t = time.monotonic()
                watchdog.beat = t
                await asyncio.sleep(0.1)
                recent.append(time.monotonic() - t - 0.1)
                self._loop_lag_s = max(recent)
        finally:
            watchdog.stop()

    def ensure(self, node_id: str) -> None:
        """Send traffic to `node_id` (again, after a restart)."""
        task = self._tasks.get(node_id)
        if task is not None and not task.done():
            task.cancel()  # it drove the node before its restart
        self._tasks[node_id] = asyncio.create_task(self._drive(node_id), name=f"traffic-{node_id}")

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    def answered(self, version: str) -> tuple[int, int]:
        """(answers, non-finite answers) by `version`, fleet-wide."""
        return (
            sum(s.by_version.get(version, [0, 0])[0] for s in self.stats.values()),
            sum(s.by_version.get(version, [0, 0])[1] for s in self.stats.values()),
        )

    def failures(self) -> list[str]:
        """Every failed request, as "node: CODE: details" (empty when no request failed)."""
        return [f"{n}: {m}" for n, s in self.stats.items() for m in s.failure_messages]

    def nodes_served_by(self, version: str) -> set[str]:
        return {n for n, s in self.stats.items() if s.by_version.get(version, [0])[0]}

    async def _drive(self, node_id: str) -> None:
        stats = self.stats.setdefault(node_id, NodeTraffic())
        interval_s = 1.0 / self.rate_per_node_s
        await asyncio.sleep(random.Random(node_id).random() * interval_s)  # spread the calls over time
        node = self.fleet.nodes.get(node_id)
        if node is None:
            return
        options = secure_channel_options(peer_id=node_id)
        async with grpc.aio.secure_channel(node.address, self._creds, options=options) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            while self.fleet.nodes.get(node_id) is node:
                if _inference(node).active is None:
                    await asyncio.sleep(interval_s)
                    continue
                x = partly_nan_input(
                    PARTLY_NAN_LAYERS[0], bad=bool(self._rng.random() < self.bad_share), rng=self._rng
                )
                request = inference_pb2.InferRequest(
                    inputs=[
                        inference_pb2.Tensor(
                            name="input", dtype="float32", shape=[1, PARTLY_NAN_LAYERS[0]], data=x.tobytes()
                        )
                    ]
                )
                stats.requests += 1
                before = _inference(node).active
                sent = time.monotonic()
                try:
                    # A deadline for a request that never comes back, not a latency bound: 20 nodes share
                    # this process, and beside a CPU hog their one event loop stood still for 4.6 s once
                    # (watchdog), failing every node's request in flight with a 5 s deadline.
                    reply = await stub.Infer(request, timeout=REQUEST_DEADLINE_S)
                except grpc.aio.AioRpcError as exc:
                    if self.fleet.nodes.get(node_id) is not node:
                        stats.cut_by_stop += 1  # the test stopped the device under the request
                        break
                    stats.failures += 1
                    # Enough to tell a stuck node from a starved test process: when, how long, which
                    # version was active around the call, and how late this event loop ran lately.
                    after = _inference(node).active
                    seen = f"{before.version if before else None} -> {after.version if after else None}"
                    stats.failure_messages.append(
                        f"{exc.code().name}: {exc.details()}"[:200]
                        + f" (at +{sent - self._started:.1f} s, after {time.monotonic() - sent:.1f} s, "
                        f"active {seen}, event loop late by up to {self._loop_lag_s:.2f} s in the last "
                        f"10 s, {threading.active_count()} threads"
                        + (f"; {self._watchdog.describe()}" if self._watchdog else "")
                        + ")"
                    )
                else:
                    out = np.frombuffer(reply.outputs[0].data, dtype=np.float32)
                    finite = bool(np.isfinite(out).all())
                    counts = stats.by_version.setdefault(reply.version, [0, 0])
                    counts[0] += 1
                    counts[1] += int(not finite)
                    if self.timeline is not None:
                        self.timeline.append((time.monotonic(), node_id, reply.version, finite))
                await asyncio.sleep(interval_s)


class RolloutFleet:
    """`nodes` nodes in `sites` sites (node i in SITES[i % sites]); each site's nodes form its Raft group."""

    def __init__(
        self,
        fleet: LocalFleet,
        workdir: Path,
        *,
        nodes: int,
        sites: int,
        timings: MembershipConfig = FLEET_TIMINGS,
        settings: RolloutSettings = FAST_ROLLOUTS,
        seed: int = 0,
        labels: dict[str, dict[str, str]] | None = None,
        runtime_versions: dict[str, str] | None = None,
        pools: str = "flat",
        representatives: int | None = None,
    ) -> None:
        """`labels`: extra labels per node id (device_class is "camera" unless given). `runtime_versions`:
        node id -> the inference runtime version that node reports (an older device, for skew tests).
        `pools="sites"`: each site its own gossip pool, `representatives` of each in the federation pool
        (a node seeds from its site's first node, and from every other site's first node for the
        federation)."""
        self.pools = pools
        self.representatives = representatives
        self.fleet = fleet
        self.workdir = Path(workdir)
        self.timings = timings
        self.settings = settings
        self.seed = seed
        self.sites = {f"node-{i:02d}": SITES[i % sites] for i in range(nodes)}
        self.labels = labels or {}
        self.runtime_versions = runtime_versions or {}
        self.nodes: dict[str, Node] = {}
        self.publisher = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
        self.operator = load_signing_key(fleet.directory / "operator.key", KeyRole.OPERATOR)
        self.manifests: dict[str, SignedManifest] = {}

    # --- nodes ---

    def members(self, site: str) -> list[str]:
        return sorted(n for n, s in self.sites.items() if s == site)

    def site_names(self) -> list[str]:
        return sorted(set(self.sites.values()))

    def config(self, node_id: str) -> NodeConfig:
        site = self.sites[node_id]
        creds = self.fleet.node_credentials(node_id)
        pools: dict[str, Any] = {}
        if self.pools == "sites":
            firsts = {
                s: next((n for n in self.members(s) if n in self.nodes and n != node_id), None)
                for s in self.site_names()
            }
            seeds = [self.nodes[n].address for s, n in firsts.items() if s == site and n is not None]
            pools = {
                "pools": "sites",
                "federation_seeds": [
                    self.nodes[n].address for s, n in firsts.items() if s != site and n is not None
                ],
                **({"representatives": self.representatives} if self.representatives is not None else {}),
            }
        else:
            seed_id = (
                "node-00" if node_id != "node-00" else next((n for n in self.nodes if n != node_id), None)
            )
            seeds = [self.nodes[seed_id].address] if seed_id in self.nodes else []
        labels = {"site": site, "device_class": "camera", **self.labels.get(node_id, {})}
        return NodeConfig(
            node_id=node_id,
            listen="127.0.0.1:0",
            seeds=seeds,
            labels=labels,
            data_dir=self.workdir / node_id,
            tls=TlsSection(dir=creds.directory),
            membership=MembershipSection.from_core(self.timings, **pools),
            inference=InferenceSection(model=MODEL, workers=1),
            raft=RaftSection(members=self.members(site), **FLEET_RAFT),
        )

    async def start(self) -> RolloutFleet:
        firsts = ["node-00"]  # everyone's seed; in sites mode, each site's first node seeds its site
        if self.pools == "sites":
            firsts = [self.members(s)[0] for s in self.site_names()]
        for node_id in firsts:
            await self.start_node(node_id)
        plain = [n for n in self.sites if n not in firsts and n not in self.runtime_versions]
        await asyncio.gather(*(self.start_node(n) for n in plain))
        for node_id in self.runtime_versions:  # one at a time: their backend reports another version
            await self.start_node(node_id)
        return self

    async def start_node(self, node_id: str) -> Node:
        """Start (or restart, with its data directory as it was) one node."""
        node = Node(
            self.config(node_id),
            rng=random.Random(f"{self.seed}-{node_id}"),
            serve_metrics=False,
            rollout_settings=self.settings,
        )
        with _reporting_runtime_version(self.runtime_versions.get(node_id)):
            await node.start()
        self.nodes[node_id] = node
        return node

    async def stop_node(self, node_id: str, *, leave: bool = False) -> None:
        await self.nodes.pop(node_id).stop(leave=leave)

    async def close(self) -> None:
        nodes, self.nodes = list(self.nodes.values()), {}
        await asyncio.gather(*(n.stop(leave=False) for n in nodes), return_exceptions=True)

    def converged(self) -> bool:
        """Flat: every node sees every other alive. Sites mode: every node sees its site alive, every site
        has a representative, and every representative sees all of them in the federation pool."""
        if self.pools == "sites":
            reps = {i for i, n in self.nodes.items() if n.federation is not None and n.federation.active}
            if {self.sites[i] for i in reps} != {self.sites[i] for i in self.nodes}:
                return False
            for node_id, node in self.nodes.items():
                alive = {m.node_id for m in node.membership.members() if m.state is State.ALIVE}
                if not {n for n in self.members(self.sites[node_id]) if n in self.nodes} <= alive:
                    return False
                fed = node.federation.view() if node_id in reps and node.federation is not None else None
                if fed is not None and {m.node_id for m in fed.members() if m.state is State.ALIVE} != reps:
                    return False
            return True
        want = set(self.nodes)
        return all(
            {m.node_id for m in n.membership.members() if m.state is State.ALIVE} >= want
            for n in self.nodes.values()
        )

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Every node sees every other, and every site group has a leader."""
        await wait_for(self.converged, timeout_s, what="membership convergence", interval_s=0.1)
        for site in self.site_names():
            node = next(self.nodes[n] for n in self.members(site) if n in self.nodes)
            await _group(node).raft.wait_for_leader(timeout_s)

    def leader(self, site: str) -> Node | None:
        return next(
            (
                self.nodes[n]
                for n in self.members(site)
                if n in self.nodes and _group(self.nodes[n]).raft.is_leader
            ),
            None,
        )

    # --- models ---

    def publish(self, version: str, model: bytes, *, at: str = "node-00") -> Manifest:
        """Publish `model` as `version` at node `at` (the origin) and announce it."""
        path = self.workdir / f"{MODEL}-{version}.tflite"
        path.write_bytes(model)
        origin = self.nodes[at]
        signed = publish(path, name=MODEL, version=version, key=self.publisher, store=origin.store)
        origin.distributor.add_published(signed)
        self.manifests[version] = signed
        return signed.manifest

    def serving(self, node_id: str) -> str | None:
        active = _inference(self.nodes[node_id]).active
        return None if active is None else active.version

    def all_serving(self, version: str, among: list[str] | None = None) -> bool:
        return all(self.serving(n) == version for n in (among if among is not None else self.nodes))

    # --- plans and commands ---

    def plan(
        self,
        rollout_id: str,
        *,
        target: str,
        baseline: str,
        shares: tuple[int, ...] = (10_000, 100_000, 1_000_000),
        soak_s: float = 2.0,
        min_requests: int = 10,
        max_error_rate: float = 0.05,
        deadline_s: float | None = None,
        selector: Selector | None = None,
        ttl_s: float = 3600.0,
        prefetch: PrefetchPolicy = PrefetchPolicy.LOW,
        key: SigningKey | None = None,
        min_runtime: str | None = None,
        autonomous_share_ppm: int = 100_000,
    ) -> SignedPlan:
        """A plan for `target` over `baseline` (both published here), signed by `key` (the publisher's)."""
        t, b = self.manifests[target].manifest, self.manifests[baseline].manifest
        key = key or self.publisher
        created = time.time()
        plan = RolloutPlan(
            rollout_id=rollout_id,
            model=MODEL,
            target_version=target,
            target_digest=self.manifests[target].digest,
            baseline_version=baseline,
            baseline_digest=self.manifests[baseline].digest,
            skew=SkewRule(min_runtime or t.min_runtime_version, signature_digest(t.signature), t.size_bytes),
            created_at=created,
            expires_at=expiry(created, ttl_s),
            publisher_key_id=key.key_id,
            waves=tuple(
                Wave(
                    s,
                    soak_s=soak_s,
                    min_requests=min_requests,
                    max_error_rate=max_error_rate,
                    deadline_s=deadline_s,
                )
                for s in shares
            ),
            selector=selector or Selector(),
            autonomous_scope=AutonomousScope(autonomous_share_ppm),
            prefetch=prefetch,
        )
        del b
        if key.role is not KeyRole.PUBLISHER:  # sign_plan refuses: forge the signature by hand (tests)
            return SignedPlan(plan, key.sign(plan.signed_bytes()))
        return sign_plan(plan, key)

    def command(
        self,
        signed: SignedPlan,
        action: CommandAction,
        *,
        wave: int | None = None,
        reason: str = "",
        key: SigningKey | None = None,
    ) -> RolloutCommand:
        return sign_command(
            key or self.operator,
            signed.plan,
            action,
            now=time.time(),
            ttl_s=600.0,
            nonce=secrets.token_urlsafe(12),
            wave=wave,
            reason=reason or ("test abort" if action is CommandAction.ABORT else ""),
        )

    async def start_rollout(self, signed: SignedPlan, *, via: str = "node-00") -> LedgerResult:
        """Register `signed` through node `via` (as `mesh rollout start` does), retried while its site group
        elects a leader (registering a plan twice changes nothing)."""
        return await _retried(lambda: _rollouts(self.nodes[via]).start(signed))

    async def send(self, command: RolloutCommand, *, via: str = "node-00") -> LedgerResult | None:
        """Send an operator command through node `via` (as `mesh rollout approve` and friends do), retried
        like `start_rollout`; check the answer with `took_effect`."""
        return await _retried(lambda: _rollouts(self.nodes[via]).command(command))

    # --- reading state ---

    def site_state(self, site: str, rollout_id: str) -> SiteRollout | None:
        """The rollout as the first running member of `site` holds it."""
        for node_id in self.members(site):
            if node_id in self.nodes:
                known = _group(self.nodes[node_id]).rollout(rollout_id)
                return None if known is None else known[1]
        return None

    def states(self, rollout_id: str) -> dict[str, tuple[str, int]]:
        """site -> (state, wave), as each site's first running member holds it."""
        out = {}
        for site in self.site_names():
            s = self.site_state(site, rollout_id)
            out[site] = ("unregistered", 0) if s is None else (s.state.value, s.wave)
        return out

    def every_site(self, rollout_id: str, state: RolloutState) -> bool:
        """Every running member of every site holds the rollout in `state`."""
        for node in self.nodes.values():
            known = _group(node).rollout(rollout_id)
            if known is None or known[1].state is not state:
                return False
        return True

    def audit_kinds(self, node_id: str, rollout_id: str) -> list[tuple[str, dict]]:
        return [
            (r.kind, dict(r.payload))
            for r in _group(self.nodes[node_id]).audit_records()
            if r.kind.startswith("rollout") and r.payload.get("rollout_id") == rollout_id
        ]


def took_effect(result: LedgerResult | None) -> bool:
    """Applied by this call, or by an earlier attempt of it whose reply was lost: sent again, a plan answers
    NOOP "already registered" and a command NOOP "already applied" (`send` and `start_rollout` retry).
    A command whose first application changed nothing is answered "already accepted ... changed nothing
    then": not taken effect."""
    if result is None:
        return False
    if result.outcome is Outcome.APPLIED:
        return True
    return result.outcome is Outcome.NOOP and (
        "is already registered" in result.message or "was already applied" in result.message
    )


# How long `start_rollout` and `send` keep retrying while a site group has no leader or changes leaders. A
# group of in-process nodes on a starved machine (20 nodes in one process beside `stress-ng --cpu 2`) was
# seen without a stable leader for over 20 s: five attempts (about 17 s) were not enough (loaded run of
# `make test`, 2026-12-07). Both are safe to repeat (see `took_effect`).
RETRY_FOR_S = 90.0


async def _retried(submit, within_s: float = RETRY_FOR_S):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        try:
            return await submit()
        except (RaftError, GroupError):
            if loop.time() + 0.5 >= deadline:
                raise
            await asyncio.sleep(0.5)


@contextlib.contextmanager
def _reporting_runtime_version(version: str | None) -> Iterator[None]:
    """While a node starts, make its inference backend report `version` (a real LiteRT that says it is
    older): the only way to have devices of two runtime versions in one process."""
    if version is None:
        yield
        return
    real = node_runtime.load_backend

    def older(name: str | None = None):
        return dataclasses.replace(real(name), version=version)

    node_runtime.load_backend = older
    try:
        yield
    finally:
        node_runtime.load_backend = real


__all__ = ["FAST_ROLLOUTS", "MODEL", "RolloutFleet", "Traffic", "RolloutState"]
