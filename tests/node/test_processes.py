"""Real `mesh node` processes: crash detection (SIGKILL), pause and refutation
(SIGSTOP/SIGCONT), clean shutdown (SIGTERM). Observed the way an operator
would, through the admin client and the nodes' logs."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from mesh.admin.client import AdminClient, AdminError
from mesh.membership.config import MembershipConfig
from mesh.membership.messages import State
from mesh.node.local import FAST_TIMINGS, free_ports, poll_until, spawn_node_process, write_node_config


@dataclass
class Proc:
    node_id: str
    address: str
    log: Path
    process: object
    admin: AdminClient


class ProcessCluster:
    def __init__(self, fleet, workdir: Path, n: int, timings: MembershipConfig) -> None:
        self.timings = timings
        ports = free_ports(n)
        self.procs: dict[str, Proc] = {}
        for i, port in enumerate(ports):
            node_id = f"proc-{i:02d}"
            address = f"127.0.0.1:{port}"
            config = workdir / f"{node_id}.toml"
            write_node_config(config, node_id=node_id, address=address,
                              seeds=[f"127.0.0.1:{ports[0]}"] if i else [], site=f"site-{i % 3}",
                              tls_dir=fleet.node_credentials(node_id).directory, data_dir=workdir / node_id,
                              timings=timings, log_level="debug")
            log = workdir / f"{node_id}.log"
            self.procs[node_id] = Proc(node_id, address, log, spawn_node_process(config, log),
                                       AdminClient(address, fleet.operator, timeout_s=1.0))

    def view(self, node_id: str) -> dict[str, tuple[State, int]] | None:
        try:
            members = self.procs[node_id].admin.status().members
            return {m.node_id: (State(m.state), m.incarnation) for m in members}
        except AdminError:
            return None

    def wait(self, predicate, timeout_s: float, what: str) -> float:
        return poll_until(predicate, timeout_s, what, check=self.check_alive)

    def check_alive(self) -> None:
        for p in self.procs.values():
            if p.process.poll() not in (None, -signal.SIGKILL):
                raise AssertionError(f"{p.node_id} exited with {p.process.returncode}:\n"
                                     f"{p.log.read_text()[-3000:]}")

    def converged(self, ids) -> bool:
        for node_id in ids:
            view = self.view(node_id)
            if view is None or {m for m, (s, _) in view.items() if s is State.ALIVE} != set(ids):
                return False
        return True

    def close(self) -> None:
        for p in self.procs.values():
            if p.process.poll() is None:
                p.process.kill()
            p.process.wait()
            p.admin.__exit__(None, None, None)


@pytest.fixture
def processes(fleet, tmp_path):
    made = []

    def make(n: int, timings: MembershipConfig = FAST_TIMINGS) -> ProcessCluster:
        made.append(ProcessCluster(fleet, tmp_path, n, timings))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_sigkilled_node_is_marked_dead_by_every_survivor_within_the_bound(processes):
    c = processes(10)
    ids = list(c.procs)
    c.wait(lambda: c.converged(ids), 30, "10 processes converge")
    victim = c.procs["proc-04"]
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    killed_at = time.monotonic()
    survivors = [i for i in ids if i != victim.node_id]
    detected: dict[str, float] = {}

    def all_detected() -> bool:
        for node_id in survivors:
            if node_id not in detected:
                view = c.view(node_id)
                if view and view[victim.node_id][0] is State.DEAD:
                    detected[node_id] = time.monotonic() - killed_at
        return len(detected) == len(survivors)

    bound = c.timings.detection_bound_s(10)
    # Waiting longer than the bound lets the assertion report by how much it was missed.
    c.wait(all_detected, 3 * bound, "every survivor marks the victim dead")
    slowest = max(detected.values())
    print(f"detection: first {min(detected.values()):.2f}s, last {slowest:.2f}s, "
          f"expected {c.timings.expected_detection_s(10):.2f}s, bound {bound:.2f}s")
    # Polling 9 admin endpoints adds at most a few tens of ms per pass.
    assert slowest <= bound + 0.5, f"last survivor took {slowest:.2f}s, bound is {bound:.2f}s"


def test_paused_node_refutes_suspicion_and_stays_alive(processes):
    # A long suspicion timeout gives the resumed process time to hear of its
    # suspicion and refute it before anyone declares it dead.
    c = processes(5, replace(FAST_TIMINGS, suspicion_mult=15))
    ids = list(c.procs)
    c.wait(lambda: c.converged(ids), 30, "5 processes converge")
    paused = c.procs["proc-02"]
    others = [i for i in ids if i != paused.node_id]
    before = c.view(others[0])[paused.node_id][1]
    paused.process.send_signal(signal.SIGSTOP)
    try:
        c.wait(lambda: any((c.view(o) or {}).get(paused.node_id, (None,))[0] is State.SUSPECT
                           for o in others),
               10, "someone suspects the paused node")
    finally:
        paused.process.send_signal(signal.SIGCONT)

    def refuted() -> bool:
        views = [c.view(o) for o in others]
        return all(v and v[paused.node_id][0] is State.ALIVE and v[paused.node_id][1] > before for v in views)

    c.wait(refuted, c.timings.suspicion_timeout_s(5), "every node sees the refutation")
    # Nobody ever declared it dead: each node logs every membership event.
    for o in others:
        log = c.procs[o].log.read_text()
        assert f"member {paused.node_id} dead" not in log, f"{o} declared {paused.node_id} dead"


def test_sigterm_leaves_gracefully_and_exits_zero(processes):
    c = processes(3)
    ids = list(c.procs)
    c.wait(lambda: c.converged(ids), 30, "3 processes converge")
    leaver = c.procs["proc-01"]
    leaver.process.send_signal(signal.SIGTERM)
    assert leaver.process.wait(timeout=15) == 0
    c.wait(lambda: all(c.view(o)[leaver.node_id][0] is State.LEFT for o in ("proc-00", "proc-02")),
           5, "the others see proc-01 as left")
