"""The workload that runs while the nemeses act, and the sampler that watches the nodes.

Each loop has its own `random.Random` derived from the run's seed, so a replay makes the
same choices in the same order (what the nodes answer depends on timing, of course).

- infer: Infer requests on the routed streams of every site, through a random member of
  the stream's site (the node forwards to the stream's owner).
- moves: operator moves through a random member of a site: mostly one stream (within the
  guard's scope, applied at once), every `bulk_every`-th two streams (above scope: held).
- approvals: an operator lists what a random member holds and approves one of them.
- publishes: `mesh model publish` of a new version at the origin at a set time, and of a
  rogue one (signed by a key from another fleet) that no node may ever activate.
- sampler: every node's membership view, group view (leader, current), Raft term and active
  model version, every `interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.client import AgentClient, CallError
from chaos.cluster import Cluster
from chaos.history import (
    ACKNOWLEDGED,
    REFUSED,
    FaultEvent,
    Op,
    RunRecord,
    Sample,
    read_outcome,
    write_outcome,
)

PUBLISHED_VERSION = "2"
ROGUE_VERSION = "9"


@dataclass
class WorkloadSpec:
    infer_interval_s: float = 0.25
    move_interval_s: float = 2.0
    bulk_every: int = 4
    approve_interval_s: float = 3.0
    publish_at_s: float | None = 8.0  # after the fault phase begins
    rogue_publish_at_s: float | None = None
    sample_interval_s: float = 1.0


class Recorder:
    """Appends to the run record with times relative to the run's start."""

    def __init__(self, record: RunRecord, t0: float) -> None:
        self.record = record
        self.t0 = t0
        self._ids = 0

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def begin(self, kind: str, node: str, site: str, **detail: Any) -> Op:
        self._ids += 1
        op = Op(id=self._ids, kind=kind, node=node, site=site, start_s=self.now(), detail=dict(detail))
        self.record.ops.append(op)
        return op

    def end(self, op: Op, outcome: str, /, **detail: Any) -> None:
        op.end_s = self.now()
        op.outcome = outcome
        op.detail.update(detail)

    def fault(self, action: str, nemesis: str, description: str, detail: dict[str, Any]) -> None:
        self.record.faults.append(FaultEvent(self.now(), action, nemesis, description, _jsonable(detail)))

    def sample(self, node: str, kind: str, data: dict[str, Any]) -> None:
        self.record.samples.append(Sample(self.now(), node, kind, data))


def _jsonable(value: Any) -> Any:
    return json.loads(
        json.dumps(value, default=lambda o: sorted(o) if isinstance(o, set | frozenset) else str(o))
    )


class Workload:
    def __init__(
        self,
        cluster: Cluster,
        agent: AgentClient,
        recorder: Recorder,
        spec: WorkloadSpec,
        seed: int,
        model_files: list[Path],
    ) -> None:
        self.cluster = cluster
        self.agent = agent
        self.rec = recorder
        self.spec = spec
        self.seed = seed
        self.model_files = model_files
        self.stop_writes = asyncio.Event()
        self.stop_all = asyncio.Event()
        self.routes: dict[str, dict[str, str]] = {s: {} for s in cluster.plan.site_names}
        for spec_ in cluster.plan.nodes:
            for stream in spec_.streams:
                self.routes[spec_.site][stream] = spec_.node_id

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}/{name}")

    def tasks(self, fault_phase_start: float) -> list[asyncio.Task]:
        loops = [self._infer_loop(), self._move_loop(), self._approve_loop()]
        if self.spec.publish_at_s is not None:
            loops.append(
                self._publish_at(fault_phase_start + self.spec.publish_at_s, PUBLISHED_VERSION, False)
            )
        if self.spec.rogue_publish_at_s is not None:
            loops.append(
                self._publish_at(fault_phase_start + self.spec.rogue_publish_at_s, ROGUE_VERSION, True)
            )
        return [asyncio.create_task(c, name=f"workload-{i}") for i, c in enumerate(loops)]

    async def _every(self, interval_s: float, stop: asyncio.Event, body: Callable[[], Any]) -> None:
        pending: set[asyncio.Task] = set()
        while not stop.is_set():
            task = asyncio.create_task(body())
            pending.add(task)
            task.add_done_callback(pending.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)  # the operation rate
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    # -- infer --

    async def _infer_loop(self) -> None:
        rng = self.rng("infer")

        async def one() -> None:
            site = rng.choice(self.cluster.plan.site_names)
            streams = sorted(self.routes[site])
            stream = rng.choice(streams)
            entry = rng.choice(self.cluster.plan.site_members(site))
            op = self.rec.begin("infer", entry, site, stream=stream)
            try:
                reply = await self.agent.call(
                    "infer", timeout_s=3.0, address=self.cluster.address(entry), stream_id=stream, seed=op.id
                )
            except CallError as exc:
                self.rec.end(op, read_outcome(exc.code), code=exc.code, error=str(exc)[:300])
                return
            self.rec.end(op, ACKNOWLEDGED, version=reply.get("version"), model=reply.get("model"))

        await self._every(self.spec.infer_interval_s, self.stop_all, one)

    # -- moves --

    async def _move_loop(self) -> None:
        rng = self.rng("move")
        count = 0

        async def one() -> None:
            nonlocal count
            count += 1
            site = rng.choice(self.cluster.plan.site_names)
            members = self.cluster.plan.site_members(site)
            streams = sorted(self.routes[site])
            bulk = self.spec.bulk_every > 0 and count % self.spec.bulk_every == 0
            chosen = sorted(rng.sample(streams, 2 if bulk and len(streams) >= 2 else 1))
            target = rng.choice(members)
            entry = rng.choice(members)
            op = self.rec.begin("move", entry, site, streams=chosen, to=target, bulk=bulk)
            try:
                result = await self.agent.call(
                    "move", timeout_s=8.0, address=self.cluster.address(entry), streams=chosen, to_node=target
                )
            except CallError as exc:
                self.rec.end(
                    op,
                    write_outcome(exc.code, exc.phase, None),
                    code=exc.code,
                    phase=exc.phase,
                    error=str(exc)[:300],
                    **exc.detail,
                )
                return
            self.rec.end(op, write_outcome(None, "", result["outcome"]), **result)
            if result["outcome"] == "applied":
                for move in result["moves"]:
                    self.routes[site][move["stream"]] = move["to"]

        await self._every(self.spec.move_interval_s, self.stop_writes, one)

    # -- approvals --

    async def _approve_loop(self) -> None:
        rng = self.rng("approve")

        async def one() -> None:
            site = rng.choice(self.cluster.plan.site_names)
            entry = rng.choice(self.cluster.plan.site_members(site))
            pick = rng.randrange(1 << 16)
            started = self.rec.now()
            try:
                result = await self.agent.call(
                    "approve", timeout_s=8.0, address=self.cluster.address(entry), pick=pick
                )
            except CallError as exc:
                if exc.phase == "pending":
                    return  # nothing was sent: not an operation
                op = self.rec.begin("approve", entry, site)
                op.start_s = started
                self.rec.end(
                    op,
                    write_outcome(exc.code, exc.phase, None),
                    code=exc.code,
                    phase=exc.phase,
                    error=str(exc)[:300],
                    **exc.detail,
                )
                return
            if result["outcome"] == "nothing_held":
                return
            op = self.rec.begin("approve", entry, site)
            op.start_s = started
            self.rec.end(op, write_outcome(None, "", result["outcome"]), **result)
            if result["outcome"] == "applied":
                for move in result.get("moves", []):
                    self.routes[site][move["stream"]] = move["to"]

        await self._every(self.spec.approve_interval_s, self.stop_writes, one)

    # -- publishes --

    async def _publish_at(self, at_s: float, version: str, rogue: bool) -> None:
        delay = at_s - self.rec.now()
        if delay > 0:
            try:
                await asyncio.wait_for(self.stop_writes.wait(), delay)
                return
            except TimeoutError:
                pass
        origin = self.cluster.plan.ids[0]
        kind = "publish-rogue" if rogue else "publish"
        model = self.model_files[2 if rogue else 1]
        op = self.rec.begin(kind, origin, self.cluster.plan.site_of(origin), version=version, file=model.name)
        spec = self.rec.record.spec
        (spec.rogue if rogue else spec.published).append(
            version
        )  # counted even if refused: it may be on disk
        try:
            made = await asyncio.to_thread(self.cluster.publish, origin, model, version, rogue=rogue)
        except Exception as exc:  # noqa: BLE001 - a refused publish is an outcome, not a harness error
            self.rec.end(op, REFUSED, error=str(exc)[:300])
            return
        self.rec.end(op, ACKNOWLEDGED, manifest_digest=made.get("manifest_digest"))


class Sampler:
    """Periodic observations of every running node (membership, group view, term, model)."""

    def __init__(
        self,
        cluster: Cluster,
        agent: AgentClient,
        recorder: Recorder,
        interval_s: float,
        leader_names: dict[str, str],
    ) -> None:
        self.cluster = cluster
        self.agent = agent
        self.rec = recorder
        self.interval_s = interval_s
        self.leader_names = leader_names
        self.stop = asyncio.Event()
        self.rounds = 0
        self.on_round: list[Callable[[dict[str, dict[str, str]]], None]] = []

    async def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            views = await self.round()
            for hook in self.on_round:
                hook(views)
            self.rounds += 1
            wait = self.interval_s - (time.monotonic() - started)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), wait)  # the sampling period

    async def round(self) -> dict[str, dict[str, str]]:
        """One observation of every running node; returns node -> (member -> state)."""
        nodes = [n for n, p in self.cluster.procs.items() if p.running() and not p.paused]
        results = await asyncio.gather(*(self._one(n, with_model=self.rounds % 2 == 0) for n in nodes))
        return {n: v for n, v in zip(nodes, results, strict=True) if v is not None}

    async def _one(self, node: str, *, with_model: bool) -> dict[str, str] | None:
        address = self.cluster.address(node)
        view = None
        try:
            status = await self.agent.call("status", timeout_s=2.0, address=address)
            view = {m["node_id"]: m["state"] for m in status["members"]}
            self.rec.sample(node, "status", {"members": view})
        except CallError as exc:
            self.rec.sample(node, "status", {"error": exc.code})
        term_before = read_term(self.cluster.data_dir(node))
        try:
            routes = await self.agent.call("routes", timeout_s=3.0, address=address)
            group = routes["group"]
            leader = self.leader_names.get(group.get("leader") or "", group.get("leader"))
            self.rec.sample(
                node,
                "routes",
                {
                    "leader": leader,
                    "current": group.get("current"),
                    "applied_index": group.get("applied_index"),
                    "elapsed_s": routes.get("elapsed_s"),
                },
            )
            term_after = read_term(self.cluster.data_dir(node))
            if group.get("term") is not None:  # the node reports its term: use that
                term = int(group["term"])
            else:
                term = term_before if term_before == term_after else None
            if term is not None:
                self.rec.sample(
                    node,
                    "term",
                    {"term": term, "leader": leader, "source": "status" if "term" in group else "vote-file"},
                )
        except CallError as exc:
            self.rec.sample(node, "routes", {"error": exc.code})
        if with_model:
            try:
                inference = await self.agent.call("inference", timeout_s=2.0, address=address)
                self.rec.sample(node, "inference", {"active_version": inference.get("active_version")})
            except CallError:
                pass
        return view


def read_term(data_dir: Path) -> int | None:
    """The Raft term a node last made durable (raft/raft.journal.vote), read from outside.

    The node's status reports no term yet, so this is the only way to see one; it is read
    before and after the node names its leader, and a sample is kept only if both agree
    (the checker then uses only samples where a node names itself: see one_leader_per_term)."""
    try:
        return int(json.loads((data_dir / "raft" / "raft.journal.vote").read_text())["term"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
