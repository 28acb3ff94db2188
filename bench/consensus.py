"""Consensus benchmark: fleetmesh's Raft groups beside pysyncobj's TCP transport and etcd, in one run.

Every system runs 3 members on loopback, each member its own OS process with its own data dir (a
node per device, as deployed, and as etcd runs), and every commit is durable on a majority before
the proposer hears of it:

- site: fleetmesh's decisions through the guard. `SiteGroup.propose` of a small within-scope
  decision (a 274-byte command) on the leader's node: the members talk over each node's gRPC
  port under mTLS (mesh/consensus/transport.py), the journal syncs once per batch of frames
  (group commit), the guard judges the decision inside apply on every replica, and every replica
  writes the audit records of a tick's entries with one sync; the proposer is answered once its
  records are on disk.
- raw: the same transport under a bare `RaftGroup` with a trivial state machine and 274-byte
  commands: what the ledger and the audit log cost shows as site vs raw.
- tcp: the baseline the issue names, the same decisions on plain pysyncobj (SyncObj and its
  TCPTransport with a password, fleetmesh's receive rules as RaftGroup had them before the gRPC
  transport), its journal msynced after every entry and the audit log fsynced after every
  record (as fleetmesh did before group commit).
- etcd (``--against etcd``): etcd 3.4 from Debian's ``etcd-server`` (installed with apt-get when
  ``etcd`` is missing; root needed), plain HTTP on loopback, default durability: etcd fsyncs its
  WAL before it acknowledges a put, once per batch of entries. A Python grpcio client in this
  process (stubs generated at run time by grpc_tools from the subset of etcd's ``rpc.proto``
  below) sends puts of 274 bytes (key and value) to the leader. fleetmesh's proposers run in the
  leader's node process, since a node proposes its own decisions: etcd's figures include a
  client round trip that fleetmesh's do not.

Figures, at 1 and at 16 concurrent proposers (``--concurrency``), the systems taking turns in
blocks so that load on the shared machine falls on all alike: commits/s, commit latency (median,
p99), CPU time of the members (and of this process) per commit, syncs per commit on the leader,
fleetmesh/tcp and fleetmesh/etcd ratios (goals from issue 11: site >= 0.8x tcp; >= 1.0x etcd at 16
proposers and >= 0.7x at 1). Failover: the leader's process is killed (SIGKILL) ``--trials``
times; the time until a survivor leads and until a decision (or put) commits through it is
taken, median and max, also as multiples of the maximum election timeout (goal: median <= 1.5x).
etcd runs with its election timeout in the same range (heartbeat 40 ms, election timeout 200 ms,
which etcd randomises over 200-400 ms like fleetmesh's 0.2-0.4 s). The killed member restarts from
its data dir before the next trial.

The machine's cores are shared (with each other and with whatever else runs): figures are
comparable within one run, not across runs or machines.

The last line printed is one JSON object: commits_per_s_1/_16 (site), raw_commits_per_s_1/_16,
tcp_commits_per_s_1/_16, etcd_commits_per_s_1/_16 (null without --against etcd), ratio_tcp_1/_16
and ratio_etcd_1/_16 (site / other), failover_median_s and failover_max_s (site, kill to first
commit), etcd_failover_median_s, journal_flushes_per_commit_16 (site leader), then latencies,
CPU per commit and the other figures of the table.

    python bench/consensus.py
    python bench/consensus.py --against etcd
    python bench/consensus.py --quick              # smoke run, ~20 s
    python bench/consensus.py --systems site --levels 16 --commits 4000 --trials 0   # to profile:
        py-spy record --subprocesses -- python bench/consensus.py ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# gRPC's C core logs every refused connection to a killed member; keep the output readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.transport import TCPTransport

from mesh._proto import raft_pb2_grpc
from mesh.consensus import _pysyncobj_patch
from mesh.consensus.commands import propose_command
from mesh.consensus.group import SiteGroup
from mesh.consensus.ledger import DecisionLedger
from mesh.consensus.raft import RaftError, RaftGroup, RaftTimings
from mesh.consensus.transport import RaftLink, RaftServicer
from mesh.guard.audit import AuditLog
from mesh.guard.core import Allocation, Decision, DecisionKind, Policy
from mesh.identity.ca import load_credentials, load_trusted_keys
from mesh.identity.tls import server_credentials
from mesh.node.local import LocalFleet, free_ports
from mesh.node.peers import PeerChannels

MEMBERS = 3
SITE_GROUP = "bench-site"
RAW_GROUP = "bench-raw"
COMMAND_BYTES = 274  # the size of a decision command below; raw commands and etcd puts match it
TCP_PASSWORD = "bench-tcp-baseline-password-0123456789"
SYSTEMS = ("site", "raw", "tcp")
JSON_KEYS = (
    "commits_per_s_1",
    "commits_per_s_16",
    "raw_commits_per_s_1",
    "raw_commits_per_s_16",
    "tcp_commits_per_s_1",
    "tcp_commits_per_s_16",
    "etcd_commits_per_s_1",
    "etcd_commits_per_s_16",
    "ratio_tcp_1",
    "ratio_tcp_16",
    "ratio_etcd_1",
    "ratio_etcd_16",
    "failover_median_s",
    "failover_max_s",
    "etcd_failover_median_s",
    "journal_flushes_per_commit_16",
)

log = logging.getLogger("bench.consensus")


class BenchError(Exception):
    """The benchmark cannot run as asked (names what is missing and what to do)."""


# === a member's process: one node of one system ==========================================================


def decision(group: str, proposer: str, members: Sequence[str], i: int) -> Decision:
    """A small within-scope decision (an allocation change on one node) with its own nonce."""
    return Decision(
        kind=DecisionKind.SET_ALLOCATION,
        group=group,
        proposer=proposer,
        reason="bench",
        proposed_at=time.time(),
        nonce=f"b-{proposer}-{i:010d}",
        allocations=(Allocation(members[i % len(members)], 1 + i % 16),),
    )


class CountingState:
    """The bare group's state machine: counts what it applies (no ledger, no audit log)."""

    def __init__(self) -> None:
        self.applied = 0

    def apply(self, command: bytes) -> int:
        self.applied += 1
        return self.applied

    def snapshot(self) -> bytes:
        return str(self.applied).encode()

    def restore(self, data: bytes) -> None:
        self.applied = int(data)


class PerRecordAuditedLedger:
    """The tcp baseline's state machine: the same decisions and audit records as a SiteGroup, each
    audit record fsynced on its own (the design before group commit)."""

    def __init__(self, ledger: DecisionLedger, audit: AuditLog) -> None:
        self.ledger, self.audit, self.index = ledger, audit, 0

    def apply(self, command: bytes) -> Any:
        self.index += 1
        result = self.ledger.apply(command)
        for position, event in enumerate(result.audit):
            self.audit.append(
                event.kind, {**dict(event.payload), "raft_index": self.index, "raft_event": position}
            )
        return result


class _TcpTransport(TCPTransport):
    """pysyncobj's TCP transport with fleetmesh's receive rules (as RaftGroup used it before gRPC)."""

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        _pysyncobj_patch.receive_message(self._syncObj, node, message, super()._onMessageReceived)


class TcpMember(SyncObj):
    """A baseline member: SyncObj, TCPTransport with a password, durable journal synced per entry."""

    def __init__(
        self, address: str, partners: Sequence[str], data_dir: Path, timings: RaftTimings, trusted: Any
    ) -> None:
        ledger = DecisionLedger(group=SITE_GROUP, policy=Policy(), group_size=MEMBERS, trusted=trusted)
        self.state = PerRecordAuditedLedger(ledger, AuditLog(data_dir / "audit.log"))
        conf = SyncObjConf(
            autoTick=True,
            autoTickPeriod=timings.tick_period_s,
            raftMinTimeout=timings.election_min_s,
            raftMaxTimeout=timings.election_max_s,
            appendEntriesPeriod=timings.append_period_s,
            leaderFallbackTimeout=timings.leader_fallback_s,
            appendEntriesUseBatch=timings.batch_appends,
            journalFile=_pysyncobj_patch.DurableJournalPath(str(data_dir / "raft.journal")),
            appendEntriesBatchSizeBytes=2 * 1024 * 1024,
            password=TCP_PASSWORD,
            # As RaftGroup had them on TCP: pysyncobj's 5 s reconnect default made failover take up to 5 s.
            connectionTimeout=1.0,
            connectionRetryTime=0.1,
            bindRetryTime=0.1,
            useFork=False,
            dynamicMembershipChange=True,
            commandsWaitLeader=False,
            # The state cannot be pickled (an open audit log); no compaction in a run this short.
            logCompactionMinEntries=10**9,
            logCompactionMinTime=10**9,
        )
        super().__init__(address, [p for p in partners if p != address], conf, transportClass=_TcpTransport)

    @replicated
    def apply_command(self, command: bytes) -> Any:
        try:
            return self.state.apply(command)
        except Exception as exc:  # must not escape pysyncobj's tick
            return exc

    @property
    def is_leader(self) -> bool:
        return self._isLeader()

    @property
    def leader_id(self) -> str | None:
        leader = self._getLeader()
        return None if leader is None else leader.address

    async def propose(self, command: bytes, timeout_s: float = 10.0) -> Any:
        """The asyncio bridge RaftGroup.propose uses: a pysyncobj callback resolves a future on the loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Any, int]] = loop.create_future()

        def settle(result: Any, error: int) -> None:
            if not future.done():
                future.set_result((result, error))

        self.apply_command(command, callback=lambda r, e: loop.call_soon_threadsafe(settle, r, e))
        result, error = await asyncio.wait_for(future, timeout_s)
        if error != FAIL_REASON.SUCCESS or isinstance(result, Exception):
            raise BenchError(f"tcp baseline: proposal failed ({error}, {result!r})")
        return result


class Here:
    """This process's member of its system's group, and what the coordinator asks of it."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.kind, self.name, self.names = spec["kind"], spec["name"], spec["names"]
        self.addresses: dict[str, str] = spec["addresses"]
        self.data_dir = Path(spec["data_dir"])
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.timings = RaftTimings()
        self.count = 0
        self.server: grpc.aio.Server | None = None
        self.channels: PeerChannels | None = None
        self.group: SiteGroup | None = None
        self.raft: Any = None

    async def open(self) -> None:
        creds_dir = Path(self.spec["creds"])
        if self.kind == "tcp":
            self.raft = TcpMember(
                self.addresses[self.name],
                [self.addresses[n] for n in self.names],
                self.data_dir,
                self.timings,
                load_trusted_keys(creds_dir),
            )
            return
        credentials = load_credentials(creds_dir)
        servicer = RaftServicer()
        self.channels = PeerChannels(credentials)
        self.server = grpc.aio.server()
        self.server.add_secure_port(self.addresses[self.name], server_credentials(credentials))
        raft_pb2_grpc.add_RaftServicer_to_server(servicer, self.server)
        await self.server.start()
        group = SITE_GROUP if self.kind == "site" else RAW_GROUP
        channels = self.channels

        def dial(peer: str) -> raft_pb2_grpc.RaftStub | None:
            return raft_pb2_grpc.RaftStub(channels.channel(self.addresses[peer], peer))

        link = RaftLink(group=group, node_id=self.name, dial=dial, rng=random.Random(self.name))
        servicer.add(link)
        if self.kind == "site":
            self.group = SiteGroup(
                self.name,
                members=self.names,
                group=SITE_GROUP,
                data_dir=self.data_dir,
                link=link,
                trusted=load_trusted_keys(creds_dir),
                policy=Policy(),
                timings=self.timings,
            )
            self.raft = self.group.raft
        else:
            self.raft = RaftGroup(
                self.name,
                self.names,
                CountingState(),
                data_dir=self.data_dir,
                link=link,
                timings=self.timings,
            )

    def propose(self) -> Awaitable[Any]:
        self.count += 1
        if self.kind == "site":
            return self.group.propose(decision(SITE_GROUP, self.name, self.names, self.count), timeout_s=10.0)
        if self.kind == "raw":
            return self.raft.propose(
                f"raw-{self.name}-{self.count:010d}-".encode().ljust(COMMAND_BYTES, b"x"), timeout_s=10.0
            )
        return self.raft.propose(
            propose_command(decision(SITE_GROUP, self.name, self.names, self.count), now=time.time())
        )

    def status(self) -> dict[str, Any]:
        return {
            "leader": self.raft.is_leader,
            "leader_id": self.leader_name(),
            "applied": self.raft.raftLastApplied,
            "commit": self.raft.raftCommitIndex,
            "syncs": journal_syncs(self.raft),
        }

    def leader_name(self) -> str | None:
        leader = self.raft.leader_id
        if self.kind == "tcp":
            return next((n for n, a in self.addresses.items() if a == leader), None)
        return leader

    async def run(self, commits: int, concurrency: int) -> dict[str, Any]:
        """`commits` proposals from `concurrency` tasks on this member, each awaiting its commit; a
        proposal that fails when the leadership changes (the machine is shared) is proposed again."""
        retries = [0]

        async def once() -> None:
            while True:
                try:
                    await self.propose()
                    return
                except (RaftError, BenchError, TimeoutError):
                    retries[0] += 1
                    if retries[0] > 1000:
                        raise
                    await asyncio.sleep(0.01)

        elapsed, latencies = await run_block(once, commits, concurrency)
        return {"elapsed": elapsed, "latencies": latencies, "retries": retries[0]}

    async def close(self) -> None:
        if self.group is not None:
            await self.group.close()
        elif isinstance(self.raft, RaftGroup):
            await self.raft.close()
        elif self.raft is not None:
            await asyncio.to_thread(self.raft.destroy_synchronous)
            self.raft.state.audit.close()
        if self.server is not None:
            await self.server.stop(0)
        if self.channels is not None:
            await self.channels.close()


def journal_syncs(raft: Any) -> int:
    """How many times this member's durable journal has synced (mesh/consensus/_pysyncobj_patch.py)."""
    journal = raft._SyncObj__raftLog  # the journal SyncObj built through _pysyncobj_patch's factory
    return journal.flushes if isinstance(journal, _pysyncobj_patch.DurableFileJournal) else 0


async def serve_member(spec: dict[str, Any]) -> None:
    """A member process: build the member, then answer the coordinator's requests (JSON lines on stdin)."""
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    here = Here(spec)
    await here.open()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    reply({"ready": True})
    try:
        while line := await reader.readline():
            request = json.loads(line)
            op = request["op"]
            try:
                if op == "status":
                    reply(here.status())
                elif op == "run":
                    reply(await here.run(request["commits"], request["concurrency"]))
                elif op == "propose":
                    await here.propose()
                    reply({"ok": True})
                else:
                    break
            except Exception as exc:  # noqa: BLE001 - the coordinator says what failed
                reply({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        await here.close()


# === the coordinator's view of a system ===================================================================


async def run_block(
    propose: Callable[[], Awaitable[Any]], commits: int, concurrency: int
) -> tuple[float, list[float]]:
    """`commits` proposals from `concurrency` tasks, each waiting for its commit before the next."""
    latencies: list[float] = []
    remaining = [commits]

    async def proposer() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            start = time.perf_counter()
            await propose()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(proposer() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def process_cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) that these processes have used so far."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Members:
    """The 3 member processes of one fleetmesh system (site, raw or tcp), started, killed and restarted."""

    def __init__(self, kind: str, root: Path, creds: dict[str, Path], timings: RaftTimings) -> None:
        self.kind, self.root, self.creds, self.timings = kind, root, creds, timings
        self.names = list(creds)
        self.addresses = {n: f"127.0.0.1:{p}" for n, p in zip(self.names, free_ports(MEMBERS), strict=True)}
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.locks = [asyncio.Lock() for _ in self.names]

    async def start(self, i: int) -> None:
        name = self.names[i]
        spec = {
            "kind": self.kind,
            "name": name,
            "names": self.names,
            "addresses": self.addresses,
            "data_dir": str(self.root / name),
            "creds": str(self.creds[name]),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{name}.log", "ab") as errors:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--member",
                json.dumps(spec),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                limit=64 * 1024 * 1024,
            )
        self.procs[i] = proc
        line = await asyncio.wait_for(proc.stdout.readline(), 60.0)
        if not line:
            raise BenchError(f"{self.kind} member {name} did not start: {self.log_tail(i)}")

    def log_tail(self, i: int) -> str:
        path = self.root / f"{self.names[i]}.log"
        return path.read_text(errors="replace").strip()[-800:] if path.exists() else "(no log)"

    async def open(self) -> None:
        await asyncio.gather(*(self.start(i) for i in range(MEMBERS)))

    def live(self) -> list[int]:
        return [i for i, p in self.procs.items() if p.returncode is None]

    async def call(self, i: int, request: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
        proc = self.procs[i]
        async with self.locks[i]:
            proc.stdin.write((json.dumps(request) + "\n").encode())
            await proc.stdin.drain()
            line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
        if not line:
            raise BenchError(f"{self.kind} member {self.names[i]} exited: {self.log_tail(i)}")
        answer = json.loads(line)
        if "error" in answer:
            raise BenchError(f"{self.kind} member {self.names[i]}: {answer['error']}")
        return answer

    async def statuses(self, among: Sequence[int]) -> list[dict[str, Any]]:
        return await asyncio.gather(*(self.call(i, {"op": "status"}, 5.0) for i in among))

    async def leader(self, among: Sequence[int] | None = None, timeout_s: float = 30.0) -> int:
        """The member that leads and that every member of `among` follows."""
        among = list(among if among is not None else self.live())
        deadline = time.monotonic() + timeout_s
        while True:
            answers = await self.statuses(among)
            leaders = [i for i, a in zip(among, answers, strict=True) if a["leader"]]
            if len(leaders) == 1 and all(a["leader_id"] == self.names[leaders[0]] for a in answers):
                return leaders[0]
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.kind}: no single leader among {[self.names[i] for i in among]} "
                    f"within {timeout_s} s; see {self.root}/*.log"
                )
            await asyncio.sleep(0.005)

    async def says_leader(self, among: Sequence[int]) -> int | None:
        answers = await self.statuses(among)
        return next((i for i, a in zip(among, answers, strict=True) if a["leader"]), None)

    async def caught_up(self) -> None:
        leader = await self.leader()
        target = (await self.statuses([leader]))[0]["commit"]
        deadline = time.monotonic() + 30.0
        while not all(a["applied"] >= target for a in await self.statuses(self.live())):
            if time.monotonic() > deadline:
                raise BenchError(f"{self.kind}: members did not catch up with index {target}")
            await asyncio.sleep(0.005)

    async def run(self, i: int, commits: int, concurrency: int) -> dict[str, Any]:
        return await self.call(i, {"op": "run", "commits": commits, "concurrency": concurrency})

    async def propose(self, i: int) -> None:
        await self.call(i, {"op": "propose"}, 30.0)

    async def syncs(self, i: int) -> int:
        return (await self.statuses([i]))[0]["syncs"]

    def cpu_s(self) -> float:
        return process_cpu_s([p.pid for p in self.procs.values() if p.returncode is None])

    async def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def close(self) -> None:
        for i in self.live():
            with contextlib.suppress(Exception):
                self.procs[i].stdin.write(b'{"op": "quit"}\n')
        for i in list(self.procs):
            try:
                await asyncio.wait_for(self.procs[i].wait(), 10.0)
            except TimeoutError:
                await self.kill(i)


# === etcd ================================================================================================

# The part of etcd's v3 API (etcdserverpb, etcd-io/etcd api/etcdserverpb/rpc.proto) that the bench calls:
# KV.Put and Maintenance.Status. Package, service, message and field numbers are etcd's own (read from the
# descriptors of the etcd3 PyPI package, which ships etcd 3.x's rpc.proto compiled); fields the bench
# never sets are left out, which proto3 allows.
ETCD_PROTO = """
syntax = "proto3";
package etcdserverpb;

message ResponseHeader {
  uint64 cluster_id = 1; uint64 member_id = 2; int64 revision = 3; uint64 raft_term = 4;
}
message PutRequest { bytes key = 1; bytes value = 2; int64 lease = 3; bool prev_kv = 4; }
message PutResponse { ResponseHeader header = 1; }
message StatusRequest {}
message StatusResponse {
  ResponseHeader header = 1; string version = 2; int64 dbSize = 3; uint64 leader = 4;
  uint64 raftIndex = 5; uint64 raftTerm = 6;
}
service KV { rpc Put(PutRequest) returns (PutResponse) {} }
service Maintenance { rpc Status(StatusRequest) returns (StatusResponse) {} }
"""


def etcd_stubs(workdir: Path) -> tuple[Any, Any]:
    """(messages module, grpc module) generated from ETCD_PROTO with grpc_tools."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise BenchError(
            "--against etcd needs grpcio-tools to generate etcd's stubs: pip install -e '.[test]'"
        ) from None
    out = workdir / "etcd_stubs"
    out.mkdir(parents=True, exist_ok=True)
    (out / "etcd_bench.proto").write_text(ETCD_PROTO)
    include = Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "protoc",
            f"-I{out}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(out / "etcd_bench.proto"),
        ]
    )
    if status != 0:
        raise BenchError(f"grpc_tools could not compile etcd's protos (exit {status})")
    sys.path.insert(0, str(out))
    return importlib.import_module("etcd_bench_pb2"), importlib.import_module("etcd_bench_pb2_grpc")


def ensure_etcd() -> str:
    """The path of the etcd binary, after installing Debian's etcd-server if it is missing."""
    found = shutil.which("etcd")
    if found is None:
        if os.geteuid() != 0:
            raise BenchError("etcd is not installed and this is not root: run `apt-get install etcd-server`")
        print("etcd not found: installing Debian's etcd-server with apt-get", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "etcd-server"],
        ):
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise BenchError(f"`{' '.join(command)}` failed: {done.stderr.strip()[-400:]}")
        found = shutil.which("etcd")
        if found is None:
            raise BenchError("apt-get installed etcd-server but there is no etcd on PATH")
    return found


def etcd_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"etcd Version: (\S+)", out)
    return match.group(1) if match else "unknown"


class Etcd:
    """3 etcd members on loopback, each with its own data dir; started, SIGKILLed and restarted in place."""

    kind = "etcd"

    def __init__(self, binary: str, root: Path, timings: RaftTimings, stubs: tuple[Any, Any]) -> None:
        self.binary, self.root, self.timings = binary, root, timings
        # etcd randomises its election timeout over [election, 2 x election): 200-400 ms like fleetmesh's.
        # It wants election >= 5 x heartbeat, so its heartbeat is 40 ms where fleetmesh's append period is 50.
        self.election_ms = round(timings.election_min_s * 1000)
        self.heartbeat_ms = min(round(timings.append_period_s * 1000), self.election_ms // 5)
        self.pb, self.pb_grpc = stubs
        ports = free_ports(2 * MEMBERS)
        self.client = [f"127.0.0.1:{p}" for p in ports[:MEMBERS]]
        self.peer = [f"http://127.0.0.1:{p}" for p in ports[MEMBERS:]]
        self.procs: dict[int, subprocess.Popen] = {}
        self.channels = [grpc.aio.insecure_channel(a) for a in self.client]
        self.kv = [self.pb_grpc.KVStub(c) for c in self.channels]
        self.maintenance = [self.pb_grpc.MaintenanceStub(c) for c in self.channels]
        self.puts = 0
        self.value = b"v" * (COMMAND_BYTES - 16)  # key (16 bytes) + value = COMMAND_BYTES

    async def start(self, i: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cluster = ",".join(f"e{j}={self.peer[j]}" for j in range(MEMBERS))
        args = [
            self.binary,
            "--name",
            f"e{i}",
            "--data-dir",
            str(self.root / f"e{i}"),
            "--listen-client-urls",
            f"http://{self.client[i]}",
            "--advertise-client-urls",
            f"http://{self.client[i]}",
            "--listen-peer-urls",
            self.peer[i],
            "--initial-advertise-peer-urls",
            self.peer[i],
            "--initial-cluster",
            cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "bench",
            "--heartbeat-interval",
            str(self.heartbeat_ms),
            "--election-timeout",
            str(self.election_ms),
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ]
        with open(self.root / f"e{i}.log", "ab") as log_file:
            self.procs[i] = subprocess.Popen(args, stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL)

    async def open(self) -> None:
        for i in range(MEMBERS):
            await self.start(i)
        await self.leader(timeout_s=60.0)

    def check_running(self) -> None:
        """Raise BenchError naming a member that exited by itself, with the end of its log."""
        for i, proc in self.procs.items():
            if proc.poll() is not None and proc.returncode != -signal.SIGKILL:
                tail = (self.root / f"e{i}.log").read_text(errors="replace").strip()[-600:]
                raise BenchError(f"etcd member e{i} exited with {proc.returncode}: {tail or '(no output)'}")

    def live(self) -> list[int]:
        return [i for i, p in self.procs.items() if p.poll() is None]

    async def status(self, i: int, timeout_s: float = 0.5) -> Any | None:
        try:
            return await self.maintenance[i].Status(self.pb.StatusRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return None

    async def leader(self, among: Sequence[int] | None = None, timeout_s: float = 30.0) -> int:
        """The member that every member of `among` names as leader (and that says so itself)."""
        among = list(among if among is not None else self.live())
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_running()
            answers = await asyncio.gather(*(self.status(i) for i in among))
            if all(a is not None for a in answers):
                leaders = {a.leader for a in answers}
                mine = {a.header.member_id: i for i, a in zip(among, answers, strict=True)}
                if len(leaders) == 1 and (lead := leaders.pop()) in mine:
                    return mine[lead]
            if time.monotonic() > deadline:
                raise BenchError(
                    f"etcd: no single leader among members {among} within {timeout_s} s; "
                    f"see {self.root}/e*.log"
                )
            await asyncio.sleep(0.002)

    async def says_leader(self, among: Sequence[int]) -> int | None:
        answers = await asyncio.gather(*(self.status(i, 0.2) for i in among))
        return next(
            (
                i
                for i, a in zip(among, answers, strict=True)
                if a is not None and a.leader == a.header.member_id
            ),
            None,
        )

    async def caught_up(self) -> None:
        leader = await self.leader()
        target = (await self.status(leader)).raftIndex
        deadline = time.monotonic() + 30.0
        while not all(
            a is not None and a.raftIndex >= target
            for a in await asyncio.gather(*(self.status(i) for i in self.live()))
        ):
            if time.monotonic() > deadline:
                raise BenchError(f"etcd: members did not catch up with index {target}")
            await asyncio.sleep(0.005)

    async def put(self, i: int) -> None:
        self.puts += 1
        request = self.pb.PutRequest(key=b"bench/%011d" % self.puts, value=self.value)
        await self.kv[i].Put(request, timeout=10.0)

    async def run(self, i: int, commits: int, concurrency: int) -> dict[str, Any]:
        retries = [0]

        async def once() -> None:
            while True:
                try:
                    return await self.put(i)
                except grpc.aio.AioRpcError:  # etcd forwards to a new leader; retry through this member
                    retries[0] += 1
                    if retries[0] > 1000:
                        raise
                    await asyncio.sleep(0.01)

        elapsed, latencies = await run_block(once, commits, concurrency)
        return {"elapsed": elapsed, "latencies": latencies, "retries": retries[0]}

    async def propose(self, i: int) -> None:
        deadline = time.monotonic() + 30.0
        while True:
            try:
                return await self.put(i)
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.002)

    async def syncs(self, i: int) -> int:
        """etcd_disk_wal_fsync_duration_seconds_count of member i (its WAL syncs so far)."""

        def read() -> int:
            with urllib.request.urlopen(f"http://{self.client[i]}/metrics", timeout=5) as r:
                text = r.read().decode()
            match = re.search(r"^etcd_disk_wal_fsync_duration_seconds_count (\d+)", text, re.M)
            return int(match.group(1)) if match else 0

        return await asyncio.to_thread(read)

    def cpu_s(self) -> float:
        return process_cpu_s([p.pid for p in self.procs.values() if p.poll() is None])

    async def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)

    async def close(self) -> None:
        for i in list(self.procs):
            await self.kill(i)
        await asyncio.gather(*(c.close() for c in self.channels), return_exceptions=True)


# === measuring ============================================================================================


@dataclass
class Figures:
    """Latencies, busy time, CPU and syncs of one system at one concurrency, summed over blocks."""

    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    syncs: int = 0
    retries: int = 0

    def summary(self) -> dict[str, float]:
        lat = self.latencies_s
        return {
            "commits": len(lat),
            "commits_per_s": len(lat) / self.elapsed_s,
            "median_ms": statistics.median(lat) * 1e3,
            "p99_ms": percentile(lat, 0.99) * 1e3,
            "cpu_ms_per_commit": self.cpu_s * 1e3 / len(lat),
            "syncs_per_commit": self.syncs / len(lat),
        }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Run:
    """What one invocation measures; set from the command line."""

    commits: int
    blocks: int
    levels: tuple[int, ...]
    trials: int
    systems: tuple[str, ...]
    against: str | None


async def measure_commits(run: Run, systems: dict[str, Any]) -> dict[str, dict[int, Figures]]:
    """Commits of every system at every level, the systems taking turns block by block."""
    figures: dict[str, dict[int, Figures]] = {s: {c: Figures() for c in run.levels} for s in systems}
    order = list(systems)
    for concurrency in run.levels:
        for system in systems.values():  # warm up: connections, caches, the first syncs
            await system.run(await system.leader(), max(20, 2 * concurrency), concurrency)
        per_block = max(1, run.commits // run.blocks)
        for block in range(run.blocks):
            for name in order[block % len(order) :] + order[: block % len(order)]:
                system, f = systems[name], figures[name][concurrency]
                leader = await system.leader()
                syncs = await system.syncs(leader)
                cpu = system.cpu_s() + time.process_time()
                done = await system.run(leader, per_block, concurrency)
                f.cpu_s += system.cpu_s() + time.process_time() - cpu
                f.syncs += await system.syncs(leader) - syncs
                f.elapsed_s += done["elapsed"]
                f.latencies_s += done["latencies"]
                f.retries += done["retries"]
    return figures


async def failover(system: Any, trials: int, election_max_s: float) -> dict[str, Any]:
    """Kill the leader `trials` times: time until a survivor leads, and until a commit goes through it."""
    elected: list[float] = []
    committed: list[float] = []
    for _ in range(trials):
        await system.caught_up()
        old = await system.leader()
        survivors = [i for i in system.live() if i != old]
        start = time.perf_counter()
        await system.kill(old)
        while (new := await system.says_leader(survivors)) is None:
            if time.perf_counter() - start > 30:
                raise BenchError(f"{system.kind}: no new leader 30 s after killing the old one")
            await asyncio.sleep(0.002)
        elected.append(time.perf_counter() - start)
        await system.propose(new)
        committed.append(time.perf_counter() - start)
        await system.start(old)
        await system.leader()
    if not committed:
        return {}
    return {
        "trials": len(committed),
        "election_max_s": election_max_s,
        "elected_median_s": statistics.median(elected),
        "elected_max_s": max(elected),
        "committed_median_s": statistics.median(committed),
        "committed_max_s": max(committed),
        "ratio_median": statistics.median(committed) / election_max_s,
        "ratio_max": max(committed) / election_max_s,
        "committed_all_s": [round(x, 3) for x in committed],
    }


def rate(figures: dict[str, dict[int, Figures]], system: str, level: int) -> float | None:
    f = figures.get(system, {}).get(level)
    return f.summary()["commits_per_s"] if f is not None and f.latencies_s else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def report(
    run: Run,
    timings: RaftTimings,
    figures: dict[str, dict[int, Figures]],
    failovers: dict[str, dict[str, Any]],
    etcd_version_line: str | None,
) -> dict[str, Any]:
    print(
        f"{MEMBERS} member processes per system on loopback, {COMMAND_BYTES}-byte commands, each commit "
        "durable "
        f"before it is acknowledged; election timeout {timings.election_min_s}-{timings.election_max_s} s"
        + (f"; etcd {etcd_version_line}" if etcd_version_line else "")
    )
    header = (
        f"{'system':>7} {'proposers':>9} {'commits':>8} {'commits/s':>10} {'median ms':>10} {'p99 ms':>8}"
    )
    print(f"{header} {'CPU ms/commit':>13} {'syncs/commit':>12}")
    for system, by_level in figures.items():
        for level, f in by_level.items():
            if not f.latencies_s:
                continue
            s = f.summary()
            note = f"  ({f.retries} proposals retried after a leader change)" if f.retries else ""
            print(
                f"{system:>7} {level:>9} {s['commits']:>8} {s['commits_per_s']:>10.0f} "
                f"{s['median_ms']:>10.2f} "
                f"{s['p99_ms']:>8.2f} {s['cpu_ms_per_commit']:>13.2f} {s['syncs_per_commit']:>12.2f}{note}"
            )
    print(
        "  syncs: the leader's journal syncs (fleetmesh) or WAL fsyncs (etcd) per commit; CPU: all members' "
        "processes and this one"
    )
    for level in run.levels:
        site = rate(figures, "site", level)
        parts = [
            f"{name} {r:.2f}x"
            for name in ("raw", "tcp", "etcd")
            if (r := ratio(site, rate(figures, name, level))) is not None
        ]
        if parts:
            print(f"site / other at {level} proposers: {', '.join(parts)}")
    print("goals (issue 11): site/tcp >= 0.8x; site/etcd >= 1.0x at 16 proposers, >= 0.7x at 1")
    for name, f in failovers.items():
        if f:
            print(
                f"failover {name} ({f['trials']} leader kills): "
                f"new leader median {f['elected_median_s']:.3f} s, "
                f"max {f['elected_max_s']:.3f} s; first commit median {f['committed_median_s']:.3f} s, max "
                f"{f['committed_max_s']:.3f} s = {f['ratio_median']:.2f} / {f['ratio_max']:.2f} "
                "x election_max_s "
                f"({f['election_max_s']} s; goal median <= 1.5)\n  per trial: {f['committed_all_s']}"
            )

    def level_of(system: str, level: int, key: str) -> float | None:
        f = figures.get(system, {}).get(level)
        return f.summary()[key] if f is not None and f.latencies_s else None

    site_failover, etcd_failover = failovers.get("site") or {}, failovers.get("etcd") or {}
    result: dict[str, Any] = {
        "commits_per_s_1": rate(figures, "site", 1),
        "commits_per_s_16": rate(figures, "site", 16),
        "raw_commits_per_s_1": rate(figures, "raw", 1),
        "raw_commits_per_s_16": rate(figures, "raw", 16),
        "tcp_commits_per_s_1": rate(figures, "tcp", 1),
        "tcp_commits_per_s_16": rate(figures, "tcp", 16),
        "etcd_commits_per_s_1": rate(figures, "etcd", 1),
        "etcd_commits_per_s_16": rate(figures, "etcd", 16),
        "ratio_tcp_1": ratio(rate(figures, "site", 1), rate(figures, "tcp", 1)),
        "ratio_tcp_16": ratio(rate(figures, "site", 16), rate(figures, "tcp", 16)),
        "ratio_etcd_1": ratio(rate(figures, "site", 1), rate(figures, "etcd", 1)),
        "ratio_etcd_16": ratio(rate(figures, "site", 16), rate(figures, "etcd", 16)),
        "failover_median_s": site_failover.get("committed_median_s"),
        "failover_max_s": site_failover.get("committed_max_s"),
        "etcd_failover_median_s": etcd_failover.get("committed_median_s"),
        "journal_flushes_per_commit_16": level_of("site", 16, "syncs_per_commit"),
    }
    for system in ("site", "raw", "tcp", "etcd"):
        prefix = "" if system == "site" else f"{system}_"
        for level in (1, 16):
            for key in ("median_ms", "p99_ms", "cpu_ms_per_commit", "syncs_per_commit"):
                result[f"{prefix}{key}_{level}"] = level_of(system, level, key)
    result["failover_elected_median_s"] = site_failover.get("elected_median_s")
    result["failover_ratio_median"] = site_failover.get("ratio_median")
    result["tcp_failover_median_s"] = (failovers.get("tcp") or {}).get("committed_median_s")
    result["etcd_failover_max_s"] = etcd_failover.get("committed_max_s")
    return result


async def bench(run: Run, timings: RaftTimings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-consensus-") as tmp:
        root = Path(tmp)
        fleet = await asyncio.to_thread(LocalFleet, root / "fleet")
        names = [f"node-{i}" for i in range(MEMBERS)]
        creds = {n: (await asyncio.to_thread(fleet.node_credentials, n)).directory for n in names}
        systems: dict[str, Any] = {}
        etcd_version_line = None
        try:
            for kind in run.systems:
                systems[kind] = Members(kind, root / kind, creds, timings)
            if run.against == "etcd":
                binary = ensure_etcd()
                etcd_version_line = etcd_version(binary)
                systems["etcd"] = Etcd(binary, root / "etcd", timings, etcd_stubs(root))
            await asyncio.gather(*(s.open() for s in systems.values()))
            figures = await measure_commits(run, systems)
            failovers = {}
            for name in ("site", "tcp", "etcd"):
                if run.trials and name in systems:
                    failovers[name] = await failover(systems[name], run.trials, timings.election_max_s)
        finally:
            await asyncio.gather(*(s.close() for s in systems.values()), return_exceptions=True)
        return report(run, timings, figures, failovers, etcd_version_line)


def parse_args(argv: list[str] | None) -> Run:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--commits", type=int, default=1500, help="measured commits per system and level (1500)"
    )
    parser.add_argument(
        "--blocks", type=int, default=3, help="blocks per level; systems take turns per block (3)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="proposers of the concurrent level (16)")
    parser.add_argument(
        "--levels", default=None, help="comma-separated proposer counts (default: 1 and --concurrency)"
    )
    parser.add_argument(
        "--trials", type=int, default=10, help="leader kills per system for failover (10; 0: none)"
    )
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help="which of site,raw,tcp to run (default: all)"
    )
    parser.add_argument("--against", choices=["etcd"], help="also run etcd 3.4 (Debian's etcd-server) alike")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: few commits, 2 failover trials (~20 s)"
    )
    parser.add_argument("--member", help=argparse.SUPPRESS)  # a member process (started by the bench)
    args = parser.parse_args(argv)
    if args.member:
        asyncio.run(serve_member(json.loads(args.member)))
        sys.exit(0)
    systems = tuple(s for s in args.systems.split(",") if s)
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}: choose among {', '.join(SYSTEMS)}")
    try:
        levels = (
            tuple(int(x) for x in args.levels.split(","))
            if args.levels
            else tuple(sorted({1, args.concurrency}))
        )
    except ValueError:
        parser.error(f"--levels {args.levels!r} is not a comma-separated list of numbers")
    if any(level < 1 for level in levels) or args.commits < 1 or args.blocks < 1 or args.trials < 0:
        parser.error("--levels, --commits and --blocks must be >= 1 and --trials >= 0")
    if args.quick:
        return Run(commits=60, blocks=1, levels=levels, trials=2, systems=systems, against=args.against)
    return Run(args.commits, args.blocks, levels, args.trials, systems, args.against)


def main(argv: list[str] | None = None) -> int:
    run = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = asyncio.run(bench(run, RaftTimings()))
    except BenchError as exc:
        print(f"bench/consensus.py: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
