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
- rollouts: each acknowledged publish is rolled out with `mesh rollout start` (waves 1%, 10%,
  100%, the last above the autonomous scope), and an operator (`RolloutOperator`) approves held
  waves and resumes paused ones until every site has finished it. A scenario whose model family
  makes the published version bad expects every site to roll it back by itself.
- device traffic: from the publish on, every device also serves its own requests (Infer with
  no stream) every `device_infer_interval_s`, as an application on the device would: the gates
  judge a wave by the requests its devices serve.
- sampler: every node's membership view, group view (leader, current), Raft term and active
  model version, every `interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.client import AgentClient, CallError
from chaos.cluster import MODEL_NAME, Cluster
from chaos.history import (
    ACKNOWLEDGED,
    REFUSED,
    UNCERTAIN_CODES,
    UNKNOWN,
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
    rollout: bool = True  # roll out each acknowledged publish
    # `mesh rollout start` options: three waves, the last above the autonomous scope (held for an
    # approval); a short soak and few requests so that a wave is judged within seconds here
    rollout_options: tuple[str, ...] = (
        "--waves", "1,10,100",
        "--soak", "3s",
        "--min-requests", "10",
        "--deadline", "20s",
        "--max-error-rate", "0.05",
        "--autonomous-share", "10",
    )  # fmt: skip
    device_infer_interval_s: float = 0.5
    operator_interval_s: float = 1.5


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
        # device traffic and the rollout operator go on through the settle phase: a wave is judged by the
        # requests its devices serve, and a held wave waits for its approval
        self.stop_rollouts = asyncio.Event()
        self.rollout_tasks: list[asyncio.Task] = []
        self.routes: dict[str, dict[str, str]] = {s: {} for s in cluster.plan.site_names}
        self.operator = RolloutOperator(cluster, agent, recorder, spec, self.rng("operator"))
        for spec_ in cluster.plan.nodes:
            for stream in spec_.streams:
                self.routes[spec_.site][stream] = spec_.node_id

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}/{name}")

    def tasks(self, fault_phase_start: float) -> list[asyncio.Task]:
        """The workload's loops until `stop_all`; the rollout loops (device traffic, the operator), which
        run on until `stop_rollouts`, are started too and kept in `rollout_tasks`."""
        loops = [self._infer_loop(), self._move_loop(), self._approve_loop()]
        if self.spec.publish_at_s is not None:
            loops.append(
                self._publish_at(fault_phase_start + self.spec.publish_at_s, PUBLISHED_VERSION, False)
            )
        if self.spec.rogue_publish_at_s is not None:
            loops.append(
                self._publish_at(fault_phase_start + self.spec.rogue_publish_at_s, ROGUE_VERSION, True)
            )
        if self.spec.rollout and self.spec.publish_at_s is not None:
            publish_at = fault_phase_start + self.spec.publish_at_s
            self.rollout_tasks = [
                asyncio.create_task(self._device_infer_loop(publish_at), name="workload-device-infer"),
                asyncio.create_task(self._operator_loop(), name="workload-operator"),
            ]
        return [asyncio.create_task(c, name=f"workload-{i}") for i, c in enumerate(loops)]

    async def _until(self, at_s: float, stop: asyncio.Event) -> bool:
        """Wait until run time `at_s` or `stop`, whichever comes first; True if `stop` came."""
        delay = at_s - self.rec.now()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)  # the schedule
        return stop.is_set()

    async def _every(self, interval_s: float, stop: asyncio.Event, body: Callable[[], Any]) -> None:
        """Start `body` every `interval_s` (they may overlap) until `stop`, then wait for those in
        flight; cancelled, cancel them too, so no call outlives its loop."""
        pending: set[asyncio.Task] = set()
        try:
            while not stop.is_set():
                task = asyncio.create_task(body())
                pending.add(task)
                task.add_done_callback(pending.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval_s)  # the operation rate
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for task in pending:
                task.cancel()

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

    async def _device_infer_loop(self, start_at_s: float) -> None:
        """From `start_at_s` (the publish), each running device serves one request of its own (no
        stream) per tick."""
        seeds = self.rng("device-infer")
        await self._until(start_at_s, self.stop_rollouts)

        async def one(node: str) -> None:
            op = self.rec.begin("device-infer", node, self.cluster.plan.site_of(node))
            try:
                reply = await self.agent.call(
                    "infer",
                    timeout_s=3.0,
                    address=self.cluster.address(node),
                    stream_id="",
                    seed=seeds.randrange(1 << 31),
                )
            except CallError as exc:
                self.rec.end(op, read_outcome(exc.code), code=exc.code, error=str(exc)[:300])
                return
            self.rec.end(op, ACKNOWLEDGED, version=reply.get("version"), model=reply.get("model"))

        async def tick() -> None:
            running = [n for n, p in self.cluster.procs.items() if p.running() and not p.paused]
            await asyncio.gather(*(one(n) for n in running))

        await self._every(self.spec.device_infer_interval_s, self.stop_rollouts, tick)

    async def _operator_loop(self) -> None:
        """One operator round at a time: a round that waits on a slow call delays the next one
        rather than overlapping it (two rounds would act on the same held wave)."""
        while not self.stop_rollouts.is_set():
            await self.operator.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_rollouts.wait(), self.spec.operator_interval_s)

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
        if await self._until(at_s, self.stop_writes):
            return
        origin = self.cluster.plan.ids[0]
        kind = "publish-rogue" if rogue else "publish"
        model = self.model_files[2 if rogue else 1]
        op = self.rec.begin(kind, origin, self.cluster.plan.site_of(origin), version=version, file=model.name)
        spec = self.rec.record.spec
        (spec.rogue if rogue else spec.published).append(
            version
        )  # counted even if refused: it may be on disk
        if not rogue:  # the bytes a node that activates it must have loaded
            spec.published_sha256[version] = await asyncio.to_thread(_sha256, model)
        try:
            made = await asyncio.to_thread(self.cluster.publish, origin, model, version, rogue=rogue)
        except Exception as exc:  # noqa: BLE001 - a refused publish is an outcome, not a harness error
            self.rec.end(op, REFUSED, error=str(exc)[:300])
            return
        self.rec.end(op, ACKNOWLEDGED, manifest_digest=made.get("manifest_digest"))
        if not rogue and self.spec.rollout:
            await self.operator.start(version, baseline="1", origin=origin, stop=self.stop_writes)


class RolloutOperator:
    """The operator of the workload's rollouts: starts each with `mesh rollout start`, then, on every
    tick, reads where each stands and does what `mesh admin pending` would tell an operator to do:
    approve a wave held above the autonomous scope, resume a paused rollout. It never aborts: a
    rollout that ends aborted was rolled back by its sites' own gates (or a bad version caught).

    Each action is a recorded operation (rollout-start, rollout-approve, rollout-resume)."""

    RETRY_S = 8.0  # an action repeated for the same site and wave no sooner than this

    def __init__(
        self, cluster: Cluster, agent: AgentClient, recorder: Recorder, spec: WorkloadSpec, rng: random.Random
    ) -> None:
        self.cluster = cluster
        self.agent = agent
        self.rec = recorder
        self.spec = spec
        self.rng = rng
        self.rollouts: list[dict[str, Any]] = []  # as in RunSpec.rollouts, plus "status" (the latest read)
        # starts whose every attempt was refused or unanswered when the workload stopped writing: a
        # plan may still be spreading from one of them, so each tick looks for it
        self.unconfirmed: list[dict[str, Any]] = []
        self._last_action: dict[tuple[str, str, str, int], float] = {}

    def _running(self, nodes: list[str] | None = None) -> list[str]:
        nodes = nodes if nodes is not None else self.cluster.plan.ids
        return [n for n in nodes if self.cluster.procs[n].running() and not self.cluster.procs[n].paused]

    async def _known(self, rollout_id: str) -> bool:
        """Does any node answering now hold the rollout (after a start whose answer was lost)?"""
        for node in self._running():
            with contextlib.suppress(CallError):
                docs = await self.agent.call(
                    "rollout_documents",
                    timeout_s=2.0,
                    address=self.cluster.address(node),
                    rollout_id=rollout_id,
                )
                if docs["has_plan"]:
                    return True
        return False

    async def start(self, version: str, *, baseline: str, origin: str, stop: asyncio.Event) -> None:
        """`mesh rollout start` through the origin (it holds the new version's manifest), then through
        any other node, until one takes it or the workload stops writing."""
        rollout_id = f"{MODEL_NAME}-{version}-chaos"
        entry = {"rollout_id": rollout_id, "target": version, "baseline": baseline}
        self.rec.record.spec.rollouts.append(dict(entry))
        attempt = 0
        while not stop.is_set():
            candidates = self._running()
            node = origin if attempt == 0 or origin in candidates and attempt % 2 == 0 else None
            if node is None and candidates:
                node = self.rng.choice(candidates)
            attempt += 1
            if node is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2.0)  # nobody answers: retry pacing
                continue
            op = self.rec.begin("rollout-start", node, self.cluster.plan.site_of(node), **entry)
            try:
                reply = await self.agent.call(
                    "rollout",
                    timeout_s=40.0,
                    address=self.cluster.address(node),
                    action="start",
                    rollout_id=rollout_id,
                    model=MODEL_NAME,
                    version=version,
                    baseline=baseline,
                    options=list(self.spec.rollout_options),
                )
            except CallError as exc:
                uncertain = exc.code in UNCERTAIN_CODES
                self.rec.end(op, UNKNOWN if uncertain else REFUSED, code=exc.code, error=str(exc)[:300])
                # A node hands a verified plan on even when its own proposal failed: never sign a second
                # plan under the same id while the first may be spreading.
                if await self._known(rollout_id):
                    break
            else:
                took = reply.get("outcome") != "refused"
                self.rec.end(
                    op,
                    ACKNOWLEDGED if took else REFUSED,
                    outcome=reply.get("outcome"),
                    message=str(reply.get("message", ""))[:300],
                    refusal_reason=reply.get("refusal_reason"),
                    plan_digest=reply.get("plan_digest"),
                )
                if took or await self._known(rollout_id):
                    break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)  # retry pacing
        else:
            if not attempt:
                return
            if not await self._known(rollout_id):
                self.unconfirmed.append(entry)
                return
        self.rollouts.append({**entry, "status": None})

    def finished(self) -> bool:
        """Has every site finished every started rollout, as the latest reads say?"""
        return all(_finished(r["status"], self.cluster.plan.site_names) for r in self.rollouts)

    def expected_versions(self) -> dict[str, str] | None:
        """The version each node must end on, from the latest rollout's outcome in its site: its target
        where the site completed it, its baseline where the site aborted it; None while unfinished."""
        versions = {n: "1" for n in self.cluster.plan.ids}
        if not self.rollouts:
            return versions
        last = self.rollouts[-1]
        if not _finished(last["status"], self.cluster.plan.site_names):
            return None
        outcome = {row["site"]: row["state"] for row in last["status"]["sites"]}
        for node in versions:
            done = outcome[self.cluster.plan.site_of(node)]
            versions[node] = last["target"] if done == "completed" else last["baseline"]
        return versions

    def describe(self) -> str:
        parts = []
        for r in self.rollouts:
            rows = (r["status"] or {}).get("sites", [])
            where = (
                ", ".join(f"{row['site']} {row['state']} w{row['wave']}" for row in rows) or "no status yet"
            )
            parts.append(f"{r['rollout_id']}: {where}")
        return "; ".join(parts) or "no rollout started"

    async def tick(self) -> None:
        for entry in list(self.unconfirmed):
            if await self._known(entry["rollout_id"]):
                self.unconfirmed.remove(entry)
                self.rollouts.append({**entry, "status": None})
        for rollout in self.rollouts:
            if _finished(rollout["status"], self.cluster.plan.site_names):
                continue
            running = self._running()
            if not running:
                return
            node = self.rng.choice(running)
            try:
                status = await self.agent.call(
                    "rollout_status",
                    timeout_s=3.0,
                    address=self.cluster.address(node),
                    rollout_id=rollout["rollout_id"],
                )
            except CallError:
                continue  # asked again on the next tick
            rollout["status"] = {"sites": status.get("sites", []), "state": status.get("state"), "by": node}
            for row in status.get("sites", []):
                if row["state"] == "waiting_approval":
                    await self._act(rollout, row, "approve", row["wave"] + 1)
                elif row["state"] == "paused":
                    await self._act(rollout, row, "resume", row["wave"])

    async def _act(self, rollout: dict[str, Any], row: dict[str, Any], action: str, wave: int) -> None:
        key = (rollout["rollout_id"], row["site"], action, wave)
        now = self.rec.now()
        if now - self._last_action.get(key, -1e9) < self.RETRY_S:
            return
        members = self._running(self.cluster.plan.site_members(row["site"]))
        if not members:
            return
        self._last_action[key] = now
        node = self.rng.choice(members)
        op = self.rec.begin(
            f"rollout-{action}",
            node,
            row["site"],
            rollout_id=rollout["rollout_id"],
            wave=wave,
            why=row["reason"],
        )
        try:
            reply = await self.agent.call(
                "rollout",
                timeout_s=40.0,
                address=self.cluster.address(node),
                action=action,
                rollout_id=rollout["rollout_id"],
                wave=wave,
            )
        except CallError as exc:
            outcome = UNKNOWN if exc.code in UNCERTAIN_CODES else REFUSED
            self.rec.end(op, outcome, code=exc.code, error=str(exc)[:300])
            return
        self.rec.end(
            op,
            REFUSED if reply.get("outcome") == "refused" else ACKNOWLEDGED,
            outcome=reply.get("outcome"),
            message=str(reply.get("message", ""))[:300],
            refusal_reason=reply.get("refusal_reason"),
        )


FINAL_STATES = frozenset({"completed", "aborted"})


def _finished(status: dict[str, Any] | None, sites: list[str]) -> bool:
    if status is None:
        return False
    rows = {row["site"]: row["state"] for row in status.get("sites", [])}
    return all(rows.get(site) in FINAL_STATES for site in sites)


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
                self.rec.sample(
                    node,
                    "inference",
                    {
                        "active_version": inference.get("active_version"),
                        "active_sha256": inference.get("active_sha256"),
                    },
                )
            except CallError:
                pass
        return view


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_term(data_dir: Path) -> int | None:
    """The Raft term a node last made durable (raft/raft.journal.vote), read from outside.

    Used when the node's group view carries no term (a node from before it reported one): it is
    read before and after the node names its leader, and a sample is kept only if both agree
    (the checker then uses only samples where a node names itself: see one_leader_per_term)."""
    try:
        return int(json.loads((data_dir / "raft" / "raft.journal.vote").read_text())["term"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
