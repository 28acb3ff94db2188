"""Run one scenario under a seed: build, warm up, inject, heal, settle, check, report, tear down.

Teardown always runs (also on Ctrl-C, SIGTERM and harness errors): processes are killed,
namespaces deleted, tmpfs mounts removed, and the run state file cleared. What a run saw is
saved as `record.json` in its work directory, next to `report.json`, `report.txt`, the node
configs and logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from chaos import checkers
from chaos.checkers import FAIL, PASS, CheckResult
from chaos.client import AgentClient, CallError
from chaos.cluster import (
    GRPC_PORT,
    GUARD,
    LOCK_FILE,
    RAFT_PORT,
    STATE_DIR,
    STATE_FILE,
    Cluster,
    ClusterError,
    RunState,
    leader_names,
    model_files,
)
from chaos.history import NodeFinal, RunRecord, RunSpec
from chaos.nemesis import FaultBook, Nemesis, NemesisError
from chaos.net import NetError, in_ns, node_ns, run, sweep_namespaces
from chaos.report import build_report, summary_text
from chaos.scenarios import Scenario, steps_for
from chaos.workload import PUBLISHED_VERSION, Recorder, Sampler, Workload

log = logging.getLogger("chaos.runner")

DEFAULT_WORKDIR = Path("/tmp/fleetmesh-chaos")
READY_TIMEOUT_S = 150.0
HEAL_WINDOW_S = 20.0
HEAL_TARGET_CURRENT_S = 3.0


class HarnessError(Exception):
    """The harness could not run the scenario (setup failed, another run is active)."""


@dataclass
class RunResult:
    report: dict[str, Any]
    text: str
    failed: bool
    workdir: Path
    results: list[CheckResult] = field(default_factory=list)


class Run:
    """One run of a scenario; implements the nemeses' `World`."""

    DRAIN_S = 10.0  # how long the workload's loops may take to finish their calls in flight at the end

    def __init__(
        self, scenario: Scenario, seed: int, workdir: Path, *, strict: bool = False, echo=print
    ) -> None:
        self.scenario = scenario
        self.seed = seed
        self.workdir = workdir
        self.strict = strict
        self.echo = echo
        self.plan = scenario.plan()
        self.state: RunState | None = None
        self.cluster: Cluster | None = None
        self.agent: AgentClient | None = None
        self.book: FaultBook | None = None
        self.record: RunRecord | None = None
        self.rec: Recorder | None = None
        self.names: dict[str, str] = {}
        self.model_files: list[Path] = []

    # -- World --

    async def leader(self, site: str) -> str | None:
        """The node most members of `site` name as their Raft leader (current views first)."""
        members = self.plan.site_members(site)
        calls = [
            self.agent.call("routes", timeout_s=2.0, address=self.cluster.address(n))
            for n in members
            if self.cluster.procs[n].running()
        ]
        views = [v for v in await asyncio.gather(*calls, return_exceptions=True) if isinstance(v, dict)]
        for current_only in (True, False):
            named = Counter(
                self.names.get(v["group"].get("leader") or "", None)
                for v in views
                if v["group"].get("leader") and (v["group"].get("current") or not current_only)
            )
            named.pop(None, None)
            if named:
                return named.most_common(1)[0][0]
        return None

    def mark_tampered(self, node: str) -> None:
        if node not in self.record.spec.tampered_audit:
            self.record.spec.tampered_audit.append(node)

    # -- the run --

    async def execute(self) -> RunResult:
        started_wall = time.time()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state = RunState(self.workdir)
        self.cluster = Cluster(self.plan, self.workdir, self.state)
        error: str | None = None
        try:
            await self._setup()
            await self._exercise()
        except (HarnessError, ClusterError, NetError, NemesisError) as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a harness bug still gets a report and a teardown
            import traceback

            (self.workdir / "harness-error.txt").write_text(traceback.format_exc())
            where = self.workdir / "harness-error.txt"
            error = f"harness bug: {type(exc).__name__}: {exc} (traceback in {where})"
        except asyncio.CancelledError:
            error = "interrupted"
            raise
        finally:
            await self._teardown()
            if error == "interrupted":
                self.echo(
                    f"chaos: interrupted; cleaned up. Replay: python -m chaos run {self.scenario.name} "
                    f"--seed {self.seed}"
                )
        return self._conclude(started_wall, error)

    async def _setup(self) -> None:
        cluster = self.cluster
        self.echo(
            f"chaos: building {len(self.plan.nodes)} nodes in {len(self.plan.site_names)} site(s) "
            f"in {self.workdir}"
        )
        await asyncio.to_thread(cluster.build)
        self.names = leader_names(self.plan, cluster.network)
        self.model_files = model_files(self.scenario.model_family, self.workdir / "models")
        files = self.model_files
        await asyncio.to_thread(cluster.publish, self.plan.ids[0], files[0], "1")
        spec = RunSpec(
            scenario=self.scenario.name,
            seed=self.seed,
            sites={n.node_id: n.site for n in self.plan.nodes},
            raft_addresses=self.names,
            guard=GUARD,
            group_sizes={s: len(self.plan.site_members(s)) for s in self.plan.site_names},
            operator_key_ids=[cluster.fleet["operator_key_id"]],
            model="wake",
            published=["1"],
            published_sha256={"1": hashlib.sha256(files[0].read_bytes()).hexdigest()},
            bad=[PUBLISHED_VERSION] if self.scenario.model_family == "mlp-bad" else [],
            membership_bound_s=self.plan.membership_bound_s(),
            timings={
                k: getattr(self.plan.timings, k)
                for k in (
                    "probe_interval_s",
                    "probe_timeout_s",
                    "gossip_interval_s",
                    "suspicion_mult",
                    "push_pull_interval_s",
                )
            },
        )
        self.record = RunRecord(spec=spec)
        self.agent = AgentClient(cluster.fleet_dir, cluster.client_creds, self.workdir / "logs" / "agent.log")
        await self.agent.start()
        self.state.add("pids", self.agent.pid)
        self.book = FaultBook(cluster.network)
        cluster.start_all()
        took = await self._wait_ready()
        self.echo(
            f"chaos: cluster ready in {took:.1f}s (membership converged, every site has a leader, every node "
            "serves version 1)"
        )

    async def _wait_ready(self) -> float:
        start = time.monotonic()
        last = "nothing answered yet"
        while time.monotonic() - start < READY_TIMEOUT_S:
            for proc in self.cluster.procs.values():
                if not proc.running():
                    raise HarnessError(
                        f"{proc.node_id} exited with {proc.exit_code()} during start: "
                        f"{proc.log_tail(3)} (log: {proc.log_path})"
                    )
            last = await self._not_ready()
            if last is None:
                return time.monotonic() - start
            await asyncio.sleep(1.0)  # polling the cluster's readiness
        raise HarnessError(
            f"cluster not ready after {READY_TIMEOUT_S:.0f}s: {last}; logs in {self.workdir / 'logs'}"
        )

    async def _not_ready(self) -> str | None:
        """Why the cluster is not ready yet, or None."""
        ids = self.plan.ids
        addresses = [self.cluster.address(n) for n in ids]
        status = await asyncio.gather(
            *(self.agent.call("status", timeout_s=2.0, address=a) for a in addresses), return_exceptions=True
        )
        for node, s in zip(ids, status, strict=True):
            if not isinstance(s, dict):
                return f"{node} does not answer ({s})"
            alive = {m["node_id"] for m in s["members"] if m["state"] == "alive"}
            if not set(ids) <= alive:
                return f"{node} sees {len(alive & set(ids))}/{len(ids)} alive"
        routes = await asyncio.gather(
            *(self.agent.call("routes", timeout_s=3.0, address=a) for a in addresses), return_exceptions=True
        )
        for node, r in zip(ids, routes, strict=True):
            if not isinstance(r, dict) or not r["group"].get("current"):
                return f"{node} has no current view of its group's routes"
            mine = [f"{node}-a", f"{node}-b"]
            if any(s not in r["routes"] for s in mine):
                return f"{node}'s streams are not routed yet"
        inference = await asyncio.gather(
            *(self.agent.call("inference", timeout_s=2.0, address=a) for a in addresses),
            return_exceptions=True,
        )
        for node, i in zip(ids, inference, strict=True):
            if not isinstance(i, dict) or i.get("active_version") != "1":
                return f"{node} does not serve version 1 yet"
        return None

    async def _exercise(self) -> None:
        scenario, cluster = self.scenario, self.cluster
        t0 = time.monotonic()
        self.rec = Recorder(self.record, t0)
        sampler = Sampler(cluster, self.agent, self.rec, scenario.workload.sample_interval_s, self.names)
        sampler.on_round.append(self._check_convergence)
        sampler_task = asyncio.create_task(sampler.run(), name="sampler")
        workload = Workload(cluster, self.agent, self.rec, scenario.workload, self.seed, self.model_files)
        steps = steps_for(scenario, self.seed)
        fault_start = scenario.warmup_s
        tasks = workload.tasks(fault_start)
        heal_task: asyncio.Task | None = None
        try:
            await asyncio.sleep(scenario.warmup_s)  # the warm-up phase: workload without faults
            await asyncio.gather(*(self._step(fault_start + at, duration, n) for at, duration, n in steps))
            self.record.healed_at_s = self.rec.now()
            self.echo(f"chaos: every fault healed at t={self.record.healed_at_s:.1f}s; settling")
            if scenario.measure_heal:
                heal_task = asyncio.create_task(self._measure_heal(), name="measure-heal")
            await asyncio.sleep(scenario.after_heal_s)  # the workload keeps going after the heal
            workload.stop_writes.set()
            workload.stop_all.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            if heal_task is not None:
                self.record.measurements["heal"] = await heal_task
            await self._settle(workload)
        finally:
            workload.stop_writes.set()
            workload.stop_all.set()
            workload.stop_rollouts.set()
            sampler.stop.set()
            # Let the loops finish the calls they have in flight (each has its own deadline), so
            # every operation ends with what the node answered; cancel what is still there after.
            loops = [t for t in [*tasks, *workload.rollout_tasks] if not t.done()]
            if loops:
                await asyncio.wait(loops, timeout=self.DRAIN_S)
            for task in [*tasks, *workload.rollout_tasks, heal_task]:
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, *workload.rollout_tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await sampler_task
        self.record.settled_at_s = self.rec.now()
        await self._collect_final()

    async def _step(self, at_s: float, duration_s: float, nemesis: Nemesis) -> None:
        delay = at_s - self.rec.now()
        if delay > 0:
            await asyncio.sleep(delay)  # the schedule
        detail = await nemesis.apply(self)
        self.rec.fault("apply", nemesis.key, nemesis.describe(), detail)
        self.echo(
            f"chaos: t={self.rec.now():6.1f}s apply {nemesis.kind}: {nemesis.describe()} {_brief(detail)}"
        )
        await asyncio.sleep(duration_s)  # how long the fault lasts
        healed = await nemesis.heal(self)
        self.rec.fault("heal", nemesis.key, nemesis.describe(), healed)
        self.echo(f"chaos: t={self.rec.now():6.1f}s heal  {nemesis.kind} {_brief(healed)}")

    def _running(self) -> list[str]:
        return [n for n, p in self.cluster.procs.items() if p.running() and not p.paused]

    def _check_convergence(self, views: dict[str, dict[str, str]]) -> None:
        if self.record.healed_at_s is None or self.record.converged_at_s is not None:
            return
        running = set(self._running())
        if set(views) != running:
            return
        if all({m for m, s in view.items() if s == "alive"} >= running for view in views.values()):
            self.record.converged_at_s = self.rec.now()

    async def _settle(self, workload: Workload) -> None:
        """Wait until membership reconverged, every replica reads current routes, every site finished
        the workload's rollouts and every node serves the version its site's outcome says (the
        target of a completed rollout, the baseline of an aborted one); give up after the
        scenario's settle timeout."""
        deadline = time.monotonic() + self.scenario.settle_timeout_s
        last = ""
        while time.monotonic() < deadline:
            running = self._running()
            expected = workload.operator.expected_versions()
            routes = await asyncio.gather(
                *(self.agent.call("routes", timeout_s=3.0, address=self.cluster.address(n)) for n in running),
                return_exceptions=True,
            )
            models = await asyncio.gather(
                *(
                    self.agent.call("inference", timeout_s=2.0, address=self.cluster.address(n))
                    for n in running
                ),
                return_exceptions=True,
            )
            stale = [
                n
                for n, r in zip(running, routes, strict=True)
                if not isinstance(r, dict) or not r["group"].get("current")
            ]
            behind = [
                f"{n} ({m.get('active_version') if isinstance(m, dict) else 'no answer'}, "
                f"expected {expected[n]})"
                for n, m in zip(running, models, strict=True)
                if expected is not None
                and (not isinstance(m, dict) or m.get("active_version") != expected[n])
            ]
            if self.record.converged_at_s is None:
                views = {n: {} for n in running}
                statuses = await asyncio.gather(
                    *(
                        self.agent.call("status", timeout_s=2.0, address=self.cluster.address(n))
                        for n in running
                    ),
                    return_exceptions=True,
                )
                for n, s in zip(running, statuses, strict=True):
                    if isinstance(s, dict):
                        views[n] = {m["node_id"]: m["state"] for m in s["members"]}
                self._check_convergence({n: v for n, v in views.items() if v})
            last = (
                f"membership {'converged' if self.record.converged_at_s is not None else 'not converged'}; "
                f"not current: {stale or 'none'}; rollouts: {workload.operator.describe()}; "
                f"not on their site's version: {behind or 'none'}"
            )
            if self.record.converged_at_s is not None and not stale and expected is not None and not behind:
                self.echo(f"chaos: settled at t={self.rec.now():.1f}s")
                return
            await asyncio.sleep(1.0)  # polling until the cluster settles
        self.echo(
            f"chaos: did not settle within {self.scenario.settle_timeout_s:.0f}s ({last}); checking anyway"
        )

    async def _collect_final(self) -> None:
        async def attempt(op: str, node: str, timeout_s: float, **args: Any):
            error = None
            for _ in range(3):
                try:
                    return await self.agent.call(
                        op, timeout_s=timeout_s, address=self.cluster.address(node), **args
                    ), None
                except CallError as exc:
                    error = f"{op}: {exc}"
                    await asyncio.sleep(1.0)  # retry pacing for the final read
            return None, error

        async def one(node: str) -> NodeFinal:
            proc = self.cluster.procs[node]
            final = NodeFinal(node=node, site=self.plan.site_of(node), running=proc.running())
            if not final.running:
                final.errors.append(f"process exited with {proc.exit_code()}: {proc.log_tail(2)}")
                return final
            for op, attr, timeout_s in (
                ("status", "status", 2.0),
                ("routes", "routes", 3.0),
                ("audit", "audit", 8.0),
                ("inference", "inference", 2.0),
                ("models", "models", 2.0),
            ):
                value, error = await attempt(op, node, timeout_s)
                setattr(final, attr, value)
                if error:
                    final.errors.append(error)
            if self.record.spec.rollouts:
                final.rollouts = {}
                for rollout in self.record.spec.rollouts:
                    rid = rollout["rollout_id"]
                    value, error = await attempt("rollout_documents", node, 3.0, rollout_id=rid)
                    final.rollouts[rid] = value
                    if error:
                        final.errors.append(error)
            return final

        finals = await asyncio.gather(*(one(n) for n in self.plan.ids))
        self.record.final = {f.node: f for f in finals}

    async def _measure_heal(self) -> dict[str, Any]:
        """Issue 14's figures, from the moment of the heal: per node, time until a routes read
        through it passes its read barrier (it serves current reads); members marked dead
        while running, from sampled `mesh admin status` views and from the node logs."""
        heal_s = self.rec.now()
        heal_wall = time.time()
        current_after: dict[str, float | None] = {n: None for n in self.plan.ids}

        async def until_current(node: str) -> None:
            while time.monotonic() < deadline:
                try:
                    r = await self.agent.call("routes", timeout_s=2.0, address=self.cluster.address(node))
                    if r["group"].get("current"):
                        current_after[node] = round(self.rec.now() - heal_s, 2)
                        return
                except CallError:
                    pass
                await asyncio.sleep(0.2)  # polling each replica after the heal

        fresh_dead: dict[
            tuple[str, str], float
        ] = {}  # (observer, member) -> when it was declared, after the heal
        carried_dead: set[tuple[str, str]] = set()  # declared during the partition, still dead after it
        last_dead_seen = [None]

        async def watch_states() -> None:
            end = time.monotonic() + HEAL_WINDOW_S
            while time.monotonic() < end:
                running = set(self._running())
                asked = self.rec.now()
                statuses = await asyncio.gather(
                    *(
                        self.agent.call("status", timeout_s=1.0, address=self.cluster.address(n))
                        for n in running
                    ),
                    return_exceptions=True,
                )
                for observer, s in zip(running, statuses, strict=True):
                    if not isinstance(s, dict):
                        continue
                    for m in s["members"]:
                        if m["node_id"] not in running or m["state"] != "dead":
                            continue
                        pair = (observer, m["node_id"])
                        # state_age_s says when the observer declared it: after the heal is a false death.
                        declared = asked - float(m.get("state_age_s") or 0.0) - heal_s
                        last_dead_seen[0] = round(asked - heal_s, 2)
                        if declared > 0:
                            fresh_dead.setdefault(pair, round(declared, 2))
                        else:
                            carried_dead.add(pair)
                await asyncio.sleep(0.5)  # the sampling period of member states

        async def sockets_after(delay_s: float) -> dict[str, Any]:
            await asyncio.sleep(delay_s)  # when to look at the kernel's view of the connections
            return await asyncio.to_thread(self._socket_diagnostics, f"heal+{delay_s:g}s")

        deadline = time.monotonic() + 60.0
        _, sockets, *_ = await asyncio.gather(
            watch_states(), sockets_after(1.0), *(until_current(n) for n in self.plan.ids)
        )
        log_dead = self._log_dead_lines(heal_wall, heal_wall + HEAL_WINDOW_S)
        after = [s for s in self.record.samples if s.kind == "term" and s.t_s >= heal_s]
        split = next(
            (f.detail for f in self.record.faults if f.action == "apply" and "sides" in f.detail), {}
        )
        values = [v for v in current_after.values() if v is not None]
        return {
            "healed_at_s": heal_s,
            "sides": split.get("sides"),
            "leader_at_split": split.get("leader"),
            "time_to_current_reads_s": current_after,
            "all_current_after_s": max(values) if len(values) == len(current_after) else None,
            "dead_marks_20s": len(fresh_dead),
            "dead_marks": [
                f"{o} declared {m} dead at +{t}s"
                for (o, m), t in sorted(fresh_dead.items(), key=lambda x: x[1])
            ],
            "dead_from_partition_still_marked": len(carried_dead),
            "last_live_node_seen_dead_at_s": last_dead_seen[0],
            "log_dead_lines_20s": len(log_dead),
            "log_dead_lines": log_dead[:20],
            "terms_after_heal": sorted({s.data["term"] for s in after}),
            "sockets_1s_after_heal": sockets,
            "leaders_after_heal": len(
                {(s.data["term"], s.data.get("leader")) for s in after if s.data.get("leader")}
            ),
        }

    def _socket_diagnostics(self, label: str) -> dict[str, Any]:
        """The kernel's view of every node's TCP connections (`ss -tanoi` inside its namespace,
        read from outside): connects to other nodes still in SYN-SENT and gRPC connections holding
        unacknowledged data, with their next retransmission. Raw output goes to diag/."""
        out_dir = self.workdir / "diag"
        out_dir.mkdir(exist_ok=True)
        summary: dict[str, Any] = {}
        for node in self.plan.ids:
            done = run(in_ns(node_ns(node), ["ss", "-tanoi"]), check=False)
            (out_dir / f"ss-{node}-{label}.txt").write_text(done.stdout)
            summary[node] = parse_ss(done.stdout, raft_port=RAFT_PORT, grpc_port=GRPC_PORT)
        return summary

    def _log_dead_lines(self, start_wall: float, end_wall: float) -> list[str]:
        pattern = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO \S+: member (\S+) dead")
        out = []
        for node, proc in self.cluster.procs.items():
            try:
                lines = proc.log_path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                match = pattern.match(line)
                if not match:
                    continue
                at = (
                    datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
                    + int(match.group(2)) / 1000
                )
                if start_wall <= at <= end_wall:
                    out.append(f"{node}: {match.group(3)} dead at +{at - start_wall:.1f}s")
        return out

    async def _teardown(self) -> None:
        if self.agent is not None:
            with contextlib.suppress(Exception):
                await self.agent.close()
        if self.cluster is not None:
            problems = await asyncio.to_thread(self.cluster.teardown)
            for problem in problems:
                self.echo(f"chaos: teardown: {problem}")
        if self.state is not None:
            self.state.clear()

    def _conclude(self, started_wall: float, error: str | None) -> RunResult:
        record = self.record
        results: list[CheckResult] = []
        if record is not None and error is None:
            results = checkers.run_checkers(record)
            if self.scenario.measure_heal:
                results.append(heal_targets(record))
            record.save(self.workdir / "record.json")
        report = build_report(
            self.scenario,
            self.seed,
            record,
            results,
            workdir=self.workdir,
            duration_s=time.time() - started_wall,
            error=error,
            strict=self.strict,
        )
        (self.workdir / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
        text = summary_text(report)
        (self.workdir / "report.txt").write_text(text + "\n")
        failed = error is not None or any(r.failed and (self.strict or not r.advisory) for r in results)
        return RunResult(report, text, failed, self.workdir, results)


def heal_targets(record: RunRecord) -> CheckResult:
    """Issue 14's targets, reported (advisory: today's node is expected to miss them)."""
    heal = record.measurements.get("heal") or {}
    problems = []
    slow = {
        n: t
        for n, t in (heal.get("time_to_current_reads_s") or {}).items()
        if t is None or t > HEAL_TARGET_CURRENT_S
    }
    if slow:
        problems.append(
            "replicas not serving current reads within "
            f"{HEAL_TARGET_CURRENT_S:.0f}s of the heal: "
            + ", ".join(f"{n} ({'never' if t is None else f'{t:.1f}s'})" for n, t in sorted(slow.items()))
        )
    if heal.get("log_dead_lines_20s"):
        problems.append(
            f"{heal['log_dead_lines_20s']} 'member ... dead' line(s) in the node logs in the "
            f"{HEAL_WINDOW_S:.0f}s after the heal: " + "; ".join(heal.get("log_dead_lines", [])[:5])
        )
    if heal.get("dead_marks_20s"):
        problems.append(
            f"{heal['dead_marks_20s']} live node(s) marked dead in the {HEAL_WINDOW_S:.0f}s after the heal: "
            + "; ".join(heal.get("dead_marks", [])[:5])
        )
    result = checkers._result(
        "heal_targets",
        problems,
        f"every replica current within {HEAL_TARGET_CURRENT_S:.0f}s, no false deaths in {HEAL_WINDOW_S:.0f}s",
    )
    result.advisory = True
    return result


_TIMER = re.compile(r"timer:\(on,([0-9.]+)(ms|sec|min),(\d+)\)")


def parse_ss(text: str, *, raft_port: int, grpc_port: int) -> dict[str, Any]:
    """From `ss -tanoi`: connects to a node's Raft or gRPC port still in SYN-SENT, and gRPC
    connections with unacknowledged data, each as "peer next retry ... after N retransmits"."""
    syn_sent, unacked = [], []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        fields = line.split()
        if len(fields) < 5 or ":" not in fields[4]:
            continue
        state, peer = fields[0], fields[4]
        port = int(peer.rsplit(":", 1)[1]) if peer.rsplit(":", 1)[1].isdigit() else -1
        info = lines[i + 1] if i + 1 < len(lines) else ""
        timer = _TIMER.search(line)
        retry = ""
        if timer:
            value = float(timer.group(1)) * {"ms": 0.001, "sec": 1.0, "min": 60.0}[timer.group(2)]
            retry = f" next retry {value:.1f}s after {timer.group(3)} retransmits"
        if state == "SYN-SENT" and port in (raft_port, grpc_port):
            syn_sent.append(peer + retry)
        elif state == "ESTAB" and grpc_port in (port, _local_port(fields[3])) and "unacked:" in info:
            unacked.append(peer + retry)
    return {"syn_sent": syn_sent, "grpc_unacked": unacked}


def _local_port(address: str) -> int:
    tail = address.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _brief(detail: dict[str, Any]) -> str:
    keep = {
        k: v
        for k, v in detail.items()
        if k
        in (
            "nodes",
            "node",
            "isolated",
            "sides",
            "site",
            "leader",
            "deaf",
            "left",
            "bridge",
            "right",
            "file",
            "restarted",
            "offset_s",
        )
    }
    return json.dumps(keep, separators=(",", ":")) if keep else ""


# -- locking and cleanup ------------------------------------------------------------------------


@contextlib.contextmanager
def run_lock(wait_s: float = 0.0):
    """One chaos run at a time on this machine (they share the namespace names); waits up to
    `wait_s` for another run to finish."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    with LOCK_FILE.open("a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise HarnessError(
                        "another chaos run is active on this machine (see /run/fleetmesh-chaos/active.json); "
                        "wait for it, or stop it and run `python -m chaos cleanup`"
                    ) from None
                time.sleep(1.0)  # waiting for the other run's lock
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cleanup(echo=print) -> list[str]:
    """Remove what a crashed run left: its processes, mounts, and every chaos namespace."""
    done = []
    if STATE_FILE.exists():
        try:
            doc = json.loads(STATE_FILE.read_text())
        except ValueError:
            doc = {}
        for pid in doc.get("pids", []):
            if _ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
                done.append(f"killed pid {pid}")
        for mount in doc.get("mounts", []):
            if os.path.ismount(mount):
                os.system(f"umount -l {_quote(mount)}")  # noqa: S605 - path from our own state file
                done.append(f"unmounted {mount}")
        STATE_FILE.unlink(missing_ok=True)
    for ns in sweep_namespaces():
        done.append(f"deleted namespace {ns}")
    for line in done:
        echo(f"chaos cleanup: {line}")
    if not done:
        echo("chaos cleanup: nothing to clean")
    return done


def _ours(pid: int) -> bool:
    """Only processes the harness started: a node, the agent or a proxy (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"mesh node" in cmdline or b"chaos.agent" in cmdline or b"chaos.proxy" in cmdline


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def stale_state() -> str | None:
    """If a previous run's state file names a harness that is gone, say so (cleanup is safe)."""
    if not STATE_FILE.exists():
        return None
    try:
        pid = json.loads(STATE_FILE.read_text()).get("harness_pid")
    except ValueError:
        return "unreadable state file"
    if pid and Path(f"/proc/{pid}").exists() and pid != os.getpid():
        return None
    return f"leftovers of harness pid {pid}"


def new_workdir(root: Path, scenario: str, seed: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{scenario}-s{seed}-{stamp}"
    if path.exists():
        shutil.rmtree(path)
    return path


def run_one(
    scenario: Scenario,
    seed: int,
    *,
    root: Path = DEFAULT_WORKDIR,
    strict: bool = False,
    echo=print,
    lock_wait_s: float = 0.0,
) -> RunResult:
    """Run a scenario in a fresh work directory under `root`, with the run lock held (waiting up
    to `lock_wait_s` for another run)."""
    with run_lock(lock_wait_s):
        if stale_state():
            cleanup(echo)
        workdir = new_workdir(root, scenario.name, seed)
        echo(
            f"chaos: scenario {scenario.name} seed {seed} "
            f"(replay: python -m chaos run {scenario.name} --seed {seed}{' --strict' if strict else ''})"
        )
        return _run_async(Run(scenario, seed, workdir, strict=strict, echo=echo))


def _run_async(run: Run) -> RunResult:
    async def main() -> RunResult:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await run.execute()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:  # SIGTERM: torn down already; report it as an interruption
        raise KeyboardInterrupt from None


__all__ = ["HarnessError", "Run", "RunResult", "cleanup", "run_one", "PUBLISHED_VERSION", "FAIL", "PASS"]
