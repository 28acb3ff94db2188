"""Consensus benchmark: fleetmesh's Raft groups beside pysyncobj's TCP transport and etcd, in one run.

Every system runs 3 members on loopback in this machine, each member with its own data dir,
and every commit is durable on a majority before the proposer hears of it:

- site: fleetmesh's decisions through the guard. `SiteGroup.propose` of a small within-scope
  decision (a 274-byte command): the members talk over each node's gRPC port under mTLS
  (mesh/consensus/transport.py), the journal syncs once per batch of frames (group commit),
  the guard judges the decision inside apply on every replica and every replica writes its
  audit records, synced, before the proposer is answered.
- raw: the same transport under a bare `RaftGroup` with a trivial state machine and
  274-byte commands: what the ledger and the audit log cost shows as site vs raw.
- tcp: the baseline the issue names, the same decisions on plain pysyncobj (SyncObj, its
  TCPTransport with a password, fleetmesh's receive rules as RaftGroup had them before the
  gRPC transport), its journal msynced after every entry and the audit log fsynced after
  every record, as fleetmesh did before group commit.
- etcd (``--against etcd``): etcd 3.4 from Debian's ``etcd-server`` (installed with apt-get
  when ``etcd`` is missing; root needed), 3 members, plain HTTP on loopback, default
  durability (etcd fsyncs its WAL before it acknowledges a put, once per batch of entries).
  A Python grpcio client (stubs generated at run time by grpc_tools from the subset of
  etcd's ``rpc.proto`` below) sends 274-byte puts to the leader.

Figures, all at 1 and at 16 concurrent proposers (``--concurrency``), with the systems
alternating in blocks so that machine load falls on all alike: commits/s and commit latency
(median, p99); fleetmesh/tcp and fleetmesh/etcd ratios (goals from issue 11: >= 0.8x tcp,
>= 1.0x etcd at 16 proposers and >= 0.7x at 1); the site leader's journal syncs per commit.
Failover: the site leader is destroyed (its tick thread stops, its streams go quiet, as a
crash) ``--trials`` times, and the time until a survivor leads and until a decision commits
through it is taken; median and max, and as multiples of the maximum election timeout
(goal: median <= 1.5x). The same on the tcp baseline and, with ``--against etcd``, on etcd
(leader SIGKILLed) with its election timeout in the same range (heartbeat 50 ms, election
timeout 200 ms, which etcd randomises over 200-400 ms like fleetmesh's 0.2-0.4 s).

The members of every system share this machine's 2 cores, and fleetmesh's 3 members share one
Python process: figures are comparable within one run, not across runs or machines.

The last line printed is one JSON object: commits_per_s_1/_16 (site), raw_commits_per_s_1/_16,
tcp_commits_per_s_1/_16, etcd_commits_per_s_1/_16 (null without --against etcd), ratio_tcp_1/_16
and ratio_etcd_1/_16 (site / other), failover_median_s and failover_max_s (site, kill to first
commit), etcd_failover_median_s, journal_flushes_per_commit_16, then latencies and the
other figures printed in the table.

    python bench/consensus.py
    python bench/consensus.py --against etcd
    python bench/consensus.py --quick              # smoke run, ~20 s
    python bench/consensus.py --systems site --levels 16 --commits 4000 --trials 0   # to profile
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

# gRPC's C core logs every refused connection to a killed member; keep the table readable.
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
from mesh.identity.ca import Credentials, load_trusted_keys
from mesh.identity.tls import server_credentials
from mesh.node.local import LocalFleet, free_ports, wait_for
from mesh.node.peers import PeerChannels

MEMBERS = 3
SITE_GROUP = "bench-site"
RAW_GROUP = "bench-raw"
COMMAND_BYTES = 274  # the size of a decision command below; raw commands and etcd values match it
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


# --- workloads --------------------------------------------------------------------------------------------


class Decisions:
    """Small within-scope decisions (an allocation change on one node), each with its own nonce."""

    def __init__(self, members: Sequence[str]) -> None:
        self.members = list(members)
        self.count = 0

    def next(self) -> Decision:
        self.count += 1
        i = self.count
        return Decision(
            kind=DecisionKind.SET_ALLOCATION,
            group=SITE_GROUP,
            proposer=self.members[0],
            reason="bench",
            proposed_at=time.time(),
            nonce=f"bench-{i:010d}",
            allocations=(Allocation(self.members[i % len(self.members)], 1 + i % 16),),
        )


def raw_command(i: int) -> bytes:
    return f"raw-{i:010d}-".encode().ljust(COMMAND_BYTES, b"x")


class CountingState:
    """The bare groups' state machine: counts what it applies (no ledger, no audit log)."""

    def __init__(self) -> None:
        self.applied = 0

    def apply(self, command: bytes) -> int:
        self.applied += 1
        return self.applied

    def snapshot(self) -> bytes:
        return str(self.applied).encode()

    def restore(self, data: bytes) -> None:
        self.applied = int(data)


# --- fleetmesh: members on gRPC endpoints with fleet certificates (as tests/consensus/harness.py) ------


class Endpoint:
    """One member's node gRPC port: a server on loopback with the node's certificate and the Raft
    service, and the node's mTLS channels to its peers."""

    def __init__(self, credentials: Credentials) -> None:
        self.servicer = RaftServicer()
        self.channels = PeerChannels(credentials)
        self.server = grpc.aio.server()
        port = self.server.add_secure_port("127.0.0.1:0", server_credentials(credentials))
        self.address = f"127.0.0.1:{port}"
        raft_pb2_grpc.add_RaftServicer_to_server(self.servicer, self.server)

    async def close(self) -> None:
        await self.server.stop(0)
        await self.channels.close()


class Fleetmesh:
    """3 nodes' endpoints carrying two groups: the site group (SiteGroup) and a bare RaftGroup."""

    def __init__(self, root: Path, fleet: LocalFleet, timings: RaftTimings) -> None:
        self.root, self.fleet, self.timings = root, fleet, timings
        self.names = [f"node-{i}" for i in range(MEMBERS)]
        self.endpoints: dict[str, Endpoint] = {}
        self.site: dict[str, SiteGroup] = {}
        self.raw: dict[str, RaftGroup] = {}
        self.trusted = load_trusted_keys(fleet.node_credentials(self.names[0]).directory)
        self.decisions = Decisions(self.names)
        self.raw_count = 0

    async def open(self, systems: Sequence[str]) -> None:
        for name in self.names:
            endpoint = Endpoint(self.fleet.node_credentials(name))
            await endpoint.server.start()
            self.endpoints[name] = endpoint
        for name in self.names:
            if "site" in systems:
                self.start_site(name)
            if "raw" in systems:
                self.raw[name] = RaftGroup(
                    name,
                    self.names,
                    CountingState(),
                    data_dir=self.root / name / "raw",
                    link=self.link(name, RAW_GROUP),
                    timings=self.timings,
                )

    def link(self, name: str, group: str) -> RaftLink:
        endpoint = self.endpoints[name]

        def dial(peer: str) -> raft_pb2_grpc.RaftStub | None:
            target = self.endpoints.get(peer)
            return (
                None
                if target is None
                else raft_pb2_grpc.RaftStub(endpoint.channels.channel(target.address, peer))
            )

        link = RaftLink(group=group, node_id=name, dial=dial, rng=random.Random(f"{name}/{group}"))
        endpoint.servicer.add(link)
        return link

    def start_site(self, name: str) -> SiteGroup:
        member = SiteGroup(
            name,
            members=self.names,
            group=SITE_GROUP,
            data_dir=self.root / name / "site",
            link=self.link(name, SITE_GROUP),
            trusted=self.trusted,
            policy=Policy(),
            timings=self.timings,
        )
        self.site[name] = member
        return member

    async def site_leader(
        self, among: Sequence[SiteGroup] | None = None, timeout_s: float = 10.0
    ) -> SiteGroup:
        rafts = await one_leader([m.raft for m in (among or self.live_site())], timeout_s)
        return next(m for m in self.site.values() if m.raft is rafts)

    def live_site(self) -> list[SiteGroup]:
        return [m for m in self.site.values() if m.raft.tick_thread_alive()]

    async def raw_leader(self) -> RaftGroup:
        return await one_leader(list(self.raw.values()))

    def propose_site(self, leader: SiteGroup) -> Callable[[], Awaitable[Any]]:
        return lambda: leader.propose(self.decisions.next(), timeout_s=10.0)

    def propose_raw(self, leader: RaftGroup) -> Callable[[], Awaitable[Any]]:
        def propose() -> Awaitable[Any]:
            self.raw_count += 1
            return leader.propose(raw_command(self.raw_count), timeout_s=10.0)

        return propose

    async def close(self) -> None:
        await asyncio.gather(
            *(m.close() for m in self.site.values()),
            *(g.close() for g in self.raw.values()),
            return_exceptions=True,
        )
        await asyncio.gather(*(e.close() for e in self.endpoints.values()), return_exceptions=True)


async def one_leader(members: Sequence[Any], timeout_s: float = 10.0) -> Any:
    """The one member of `members` (RaftGroup or TcpMember) that leads and that all others follow."""

    def settled() -> bool:
        leaders = [m for m in members if m.is_leader]
        return len(leaders) == 1 and all(m.leader_id == leaders[0].node_id for m in members)

    await wait_for(settled, timeout_s, f"one leader among {[m.node_id for m in members]}", interval_s=0.005)
    return next(m for m in members if m.is_leader)


def journal_flushes(raft: Any) -> int:
    """How many times this member's durable journal has synced (mesh/consensus/_pysyncobj_patch.py)."""
    journal = raft._SyncObj__raftLog  # the journal SyncObj built through _pysyncobj_patch's factory
    if not isinstance(journal, _pysyncobj_patch.DurableFileJournal):
        raise BenchError(f"{type(journal).__name__} is not fleetmesh's durable journal")
    return journal.flushes


# --- the baseline: plain pysyncobj over its TCP transport ------------------------------------------------


class PerRecordAuditedLedger:
    """The same decisions and audit records as a SiteGroup, each audit record fsynced on its own (the
    design before group commit)."""

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
        data_dir.mkdir(parents=True, exist_ok=True)
        ledger = DecisionLedger(group=SITE_GROUP, policy=Policy(), group_size=MEMBERS, trusted=trusted)
        self.state = PerRecordAuditedLedger(ledger, AuditLog(data_dir / "audit.log"))
        self.address = address
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
            # The bench's state cannot be pickled (an open audit log); no compaction in a run this short.
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
    def node_id(self) -> str:
        return self.address

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

    def close_sync(self) -> None:
        if self.tick_thread_alive():
            self.destroy_synchronous()
        self.state.audit.close()


class Tcp:
    def __init__(self, root: Path, timings: RaftTimings, trusted: Any) -> None:
        self.root, self.timings, self.trusted = root, timings, trusted
        self.addresses = [f"127.0.0.1:{p}" for p in free_ports(MEMBERS)]
        self.members: dict[str, TcpMember] = {}
        self.decisions = Decisions([f"node-{i}" for i in range(MEMBERS)])

    def open(self) -> None:
        for address in self.addresses:
            self.start(address)

    def start(self, address: str) -> TcpMember:
        member = TcpMember(
            address, self.addresses, self.root / address.replace(":", "_"), self.timings, self.trusted
        )
        self.members[address] = member
        return member

    def live(self) -> list[TcpMember]:
        return [m for m in self.members.values() if m.tick_thread_alive()]

    async def leader(self, among: Sequence[TcpMember] | None = None) -> TcpMember:
        return await one_leader(list(among or self.live()))

    def propose(self, leader: TcpMember) -> Callable[[], Awaitable[Any]]:
        return lambda: leader.propose(propose_command(self.decisions.next(), now=time.time()))

    async def close(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(m.close_sync) for m in self.members.values()))


# --- etcd ------------------------------------------------------------------------------------------------

# The part of etcd's v3 API (etcdserverpb, etcd-io/etcd api/etcdserverpb/rpc.proto and mvccpb kv.proto)
# that the bench calls: KV.Put and Maintenance.Status. Package, service, message and field numbers are
# etcd's own (read from the descriptors of the etcd3 PyPI package, which ships etcd 3.x's rpc.proto
# compiled); fields the bench never sets are left out, which proto3 allows.
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
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise BenchError(f"`{' '.join(command)}` failed: {done.stderr.strip()[-400:]}")
        found = shutil.which("etcd")
        if found is None:
            raise BenchError("apt-get installed etcd-server but there is no etcd on PATH")
    return found


def etcd_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"etcd Version: (\S+)", out)
    return match.group(1) if match else out.strip().splitlines()[0] if out.strip() else "unknown"


class Etcd:
    """3 etcd members on loopback, each with its own data dir; started, SIGKILLed and restarted in place."""

    def __init__(self, binary: str, root: Path, timings: RaftTimings, stubs: tuple[Any, Any]) -> None:
        self.binary, self.root = binary, root
        # etcd randomises its election timeout over [election, 2 x election): 200-400 ms like fleetmesh's.
        # It wants election >= 5 x heartbeat, so its heartbeat is 40 ms where fleetmesh's append period is 50.
        self.election_ms = round(timings.election_min_s * 1000)
        self.heartbeat_ms = min(round(timings.append_period_s * 1000), self.election_ms // 5)
        self.pb, self.pb_grpc = stubs
        ports = free_ports(2 * MEMBERS)
        self.client = [f"127.0.0.1:{p}" for p in ports[:MEMBERS]]
        self.peer = [f"http://127.0.0.1:{p}" for p in ports[MEMBERS:]]
        self.procs: list[subprocess.Popen | None] = [None] * MEMBERS
        self.channels = [grpc.aio.insecure_channel(a) for a in self.client]
        self.kv = [self.pb_grpc.KVStub(c) for c in self.channels]
        self.maintenance = [self.pb_grpc.MaintenanceStub(c) for c in self.channels]
        self.puts = 0
        self.value = b"v" * (COMMAND_BYTES - 16)  # key (16 bytes) + value = COMMAND_BYTES

    def start(self, i: int) -> None:
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
        log_file = open(self.root / f"e{i}.log", "ab")  # noqa: SIM115 - handed to the process
        self.procs[i] = subprocess.Popen(args, stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL)
        log_file.close()

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for i in range(MEMBERS):
            self.start(i)

    def check_running(self) -> None:
        """Raise BenchError naming a member that exited by itself, with the end of its log."""
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is not None and proc.returncode != -signal.SIGKILL:
                tail = (self.root / f"e{i}.log").read_text(errors="replace").strip()[-600:]
                raise BenchError(f"etcd member e{i} exited with {proc.returncode}: {tail or '(no output)'}")

    def live(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

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

    def propose(self, i: int) -> Callable[[], Awaitable[Any]]:
        def put() -> Awaitable[Any]:
            self.puts += 1
            return self.kv[i].Put(
                self.pb.PutRequest(key=b"bench/%011d" % self.puts, value=self.value), timeout=10.0
            )

        return put

    def wal_fsyncs(self, i: int) -> int:
        """etcd_disk_wal_fsync_duration_seconds_count of member i (its WAL syncs so far)."""
        with urllib.request.urlopen(f"http://{self.client[i]}/metrics", timeout=5) as r:
            text = r.read().decode()
        match = re.search(r"^etcd_disk_wal_fsync_duration_seconds_count (\d+)", text, re.M)
        return int(match.group(1)) if match else 0

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the live members have used so far."""
        total = 0.0
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(OSError):
                    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    async def close(self) -> None:
        for i in range(MEMBERS):
            self.kill(i)
        await asyncio.gather(*(c.close() for c in self.channels), return_exceptions=True)


# --- measuring -------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """Latencies and busy time of one system at one concurrency, summed over blocks."""

    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        lat = self.latencies_s
        return {
            "cpu_ms_per_commit": self.extra.get("cpu_s", 0.0) * 1e3 / len(lat),
            "commits": len(lat),
            "commits_per_s": len(lat) / self.elapsed_s,
            "median_ms": statistics.median(lat) * 1e3,
            "p99_ms": percentile(lat, 0.99) * 1e3,
        }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


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


class ThroughLeader:
    """Proposes through a system's current leader. When the leader changes under load (the machine is
    shared), it finds the new one and proposes again: counted in `retries`, timed from the first try."""

    def __init__(
        self,
        find_leader: Callable[[], Awaitable[Any]],
        propose_on: Callable[[Any], Awaitable[Any]],
        errors: tuple[type[BaseException], ...],
    ) -> None:
        self.find_leader, self.propose_on, self.errors = find_leader, propose_on, errors
        self.leader: Any = None
        self.retries = 0

    async def __call__(self) -> Any:
        while True:
            leader = self.leader
            if leader is None:
                leader = self.leader = await self.find_leader()
            try:
                return await self.propose_on(leader)
            except self.errors as exc:
                self.retries += 1
                if self.retries > 1000:
                    raise BenchError(f"more than 1000 proposals failed; the last: {exc}") from None
                if self.leader is leader:
                    log.warning("proposal failed (%s); proposing again through the new leader", exc)
                    self.leader = None


@dataclass
class Run:
    """What one invocation measures; set from the command line."""

    commits: int
    blocks: int
    levels: tuple[int, ...]
    trials: int
    systems: tuple[str, ...]
    against: str | None


async def measure_commits(run: Run, fm: Fleetmesh | None, tcp: Tcp | None) -> dict[str, dict[int, Figures]]:
    """Commits of every system at every level, the systems taking turns block by block."""
    figures: dict[str, dict[int, Figures]] = {s: {c: Figures() for c in run.levels} for s in run.systems}
    for concurrency in run.levels:
        proposers: dict[str, ThroughLeader] = {}
        if fm is not None and "site" in run.systems:
            proposers["site"] = ThroughLeader(fm.site_leader, lambda m: fm.propose_site(m)(), (RaftError,))
        if fm is not None and "raw" in run.systems:
            proposers["raw"] = ThroughLeader(fm.raw_leader, lambda g: fm.propose_raw(g)(), (RaftError,))
        if tcp is not None:
            proposers["tcp"] = ThroughLeader(
                tcp.leader, lambda m: tcp.propose(m)(), (BenchError, TimeoutError)
            )
        for propose in proposers.values():  # warm up: connections, caches, the first fsyncs
            await run_block(propose, max(20, 2 * concurrency), concurrency)
            propose.retries = 0
        per_block = max(1, run.commits // run.blocks)
        order = list(proposers)
        for block in range(run.blocks):
            for system in order[block % len(order) :] + order[: block % len(order)]:
                f = figures[system][concurrency]
                propose = proposers[system]
                leader = propose.leader
                before = journal_flushes(leader.raft) if system == "site" else 0
                cpu_before = time.process_time()
                elapsed, latencies = await run_block(propose, per_block, concurrency)
                f.extra["cpu_s"] = f.extra.get("cpu_s", 0.0) + time.process_time() - cpu_before
                f.elapsed_s += elapsed
                f.latencies_s += latencies
                if system == "site":
                    f.extra["journal_flushes"] = (
                        f.extra.get("journal_flushes", 0) + journal_flushes(leader.raft) - before
                    )
        for system, propose in proposers.items():
            figures[system][concurrency].extra["retries"] = propose.retries
    return figures


async def failover_site(fm: Fleetmesh, trials: int) -> dict[str, Any]:
    """Destroy the site leader `trials` times: time to a new leader, and to a decision through it."""
    elected, committed = [], []
    for _ in range(trials):
        old = await fm.site_leader()
        await old.sync(5.0)
        await wait_for(
            lambda old=old: all(m.applied_index >= old.applied_index for m in fm.live_site()),
            10.0,
            "every site member caught up",
            interval_s=0.005,
        )
        survivors = [m for m in fm.live_site() if m is not old]
        start = time.perf_counter()
        old.raft.destroy()  # its tick thread stops at its next tick; its streams go quiet, as in a crash
        await wait_for(
            lambda survivors=survivors: any(m.raft.is_leader for m in survivors),
            30.0,
            "a new site leader",
            interval_s=0.002,
        )
        elected.append(time.perf_counter() - start)
        new = next(m for m in survivors if m.raft.is_leader)
        await new.propose(fm.decisions.next(), timeout_s=10.0)
        committed.append(time.perf_counter() - start)
        await old.close()
        fm.start_site(old.node_id)
    return failover_summary(elected, committed, fm.timings.election_max_s)


async def failover_tcp(tcp: Tcp, trials: int) -> dict[str, Any]:
    elected, committed = [], []
    for _ in range(trials):
        old = await tcp.leader()
        survivors = [m for m in tcp.live() if m is not old]
        await wait_for(
            lambda old=old, survivors=survivors: all(
                m.raftLastApplied >= old.raftCommitIndex for m in survivors
            ),
            10.0,
            "every tcp member caught up",
            interval_s=0.005,
        )
        start = time.perf_counter()
        old.destroy()
        await wait_for(
            lambda survivors=survivors: any(m.is_leader for m in survivors),
            30.0,
            "a new tcp leader",
            interval_s=0.002,
        )
        elected.append(time.perf_counter() - start)
        new = next(m for m in survivors if m.is_leader)
        await tcp.propose(new)()
        committed.append(time.perf_counter() - start)
        await asyncio.to_thread(old.close_sync)
        tcp.start(old.address)
        await tcp.leader()
    return failover_summary(elected, committed, tcp.timings.election_max_s)


async def failover_etcd(etcd: Etcd, trials: int, election_max_s: float) -> dict[str, Any]:
    elected, committed = [], []
    for _ in range(trials):
        old = await etcd.leader()
        survivors = [i for i in etcd.live() if i != old]
        start = time.perf_counter()
        etcd.kill(old)
        while True:  # a survivor that says it leads
            answers = await asyncio.gather(*(etcd.status(i, 0.2) for i in survivors))
            new = next(
                (
                    i
                    for i, a in zip(survivors, answers, strict=True)
                    if a is not None and a.leader == a.header.member_id
                ),
                None,
            )
            if new is not None:
                break
            if time.perf_counter() - start > 30:
                raise BenchError("etcd: no new leader 30 s after killing the old one")
            await asyncio.sleep(0.002)
        elected.append(time.perf_counter() - start)
        while True:
            try:
                await etcd.propose(new)()
                break
            except grpc.aio.AioRpcError:
                if time.perf_counter() - start > 30:
                    raise
                await asyncio.sleep(0.002)
        committed.append(time.perf_counter() - start)
        etcd.start(old)
        await etcd.leader(timeout_s=30.0)
    return failover_summary(elected, committed, election_max_s)


def failover_summary(elected: list[float], committed: list[float], election_max_s: float) -> dict[str, Any]:
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


async def measure_etcd(run: Run, root: Path, timings: RaftTimings) -> dict[str, Any]:
    binary = ensure_etcd()
    etcd = Etcd(binary, root / "etcd", timings, etcd_stubs(root))
    etcd.open()
    try:
        await etcd.leader(timeout_s=60.0)
        figures: dict[int, Figures] = {c: Figures() for c in run.levels}
        for concurrency in run.levels:
            put = ThroughLeader(etcd.leader, lambda i: etcd.propose(i)(), (grpc.aio.AioRpcError,))
            await run_block(put, max(20, 2 * concurrency), concurrency)
            put.retries = 0
            leader = put.leader
            f = figures[concurrency]
            fsyncs_before = await asyncio.to_thread(etcd.wal_fsyncs, leader)
            for _ in range(run.blocks):
                cpu_before = time.process_time() + etcd.cpu_s()
                elapsed, latencies = await run_block(put, max(1, run.commits // run.blocks), concurrency)
                f.extra["cpu_s"] = f.extra.get("cpu_s", 0.0) + time.process_time() + etcd.cpu_s() - cpu_before
                f.elapsed_s += elapsed
                f.latencies_s += latencies
            f.extra["wal_fsyncs"] = await asyncio.to_thread(etcd.wal_fsyncs, leader) - fsyncs_before
            f.extra["retries"] = put.retries
        failover = await failover_etcd(etcd, run.trials, timings.election_max_s)
        return {"version": etcd_version(binary), "figures": figures, "failover": failover}
    finally:
        await etcd.close()


# --- the run ---------------------------------------------------------------------------------------------


def rate(figures: dict[str, dict[int, Figures]], system: str, level: int) -> float | None:
    f = figures.get(system, {}).get(level)
    return f.summary()["commits_per_s"] if f is not None and f.latencies_s else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def report(
    run: Run,
    timings: RaftTimings,
    figures: dict[str, dict[int, Figures]],
    failover: dict[str, Any],
    tcp_failover: dict[str, Any],
    etcd: dict[str, Any] | None,
) -> dict[str, Any]:
    if etcd is not None:
        figures = {**figures, "etcd": etcd["figures"]}
    print(
        f"{MEMBERS} members per system on loopback, {COMMAND_BYTES}-byte commands, commits durable before "
        f"it is acknowledged; election timeout {timings.election_min_s}-{timings.election_max_s} s"
        + (f"; etcd {etcd['version']}" if etcd else "")
    )
    print(
        f"{'system':>8} {'proposers':>9} {'commits':>8} {'commits/s':>10} {'median ms':>10} {'p99 ms':>8} "
        "notes"
    )
    for system, by_level in figures.items():
        for level, f in by_level.items():
            if not f.latencies_s:
                continue
            s = f.summary()
            notes = [f"CPU {s['cpu_ms_per_commit']:.2f} ms/commit"]
            if "journal_flushes" in f.extra:
                notes.append(f"leader journal syncs/commit {f.extra['journal_flushes'] / s['commits']:.2f}")
            if "wal_fsyncs" in f.extra:
                notes.append(f"leader WAL fsyncs/put {f.extra['wal_fsyncs'] / s['commits']:.2f}")
            if f.extra.get("retries"):
                notes.append(f"{f.extra['retries']:.0f} proposals retried after a leader change")
            print(
                f"{system:>8} {level:>9} {s['commits']:>8} {s['commits_per_s']:>10.0f} "
                f"{s['median_ms']:>10.2f} "
                f"{s['p99_ms']:>8.2f}  {'; '.join(notes)}"
            )
    for level in run.levels:
        site = rate(figures, "site", level)
        parts = [
            f"{name} {r:.2f}x"
            for name, r in (
                ("raw", ratio(site, rate(figures, "raw", level))),
                ("tcp", ratio(site, rate(figures, "tcp", level))),
                ("etcd", ratio(site, rate(figures, "etcd", level))),
            )
            if r is not None
        ]
        if parts:
            print(f"site / other at {level} proposers: {', '.join(parts)}")
    print("goals (issue 11): site/tcp >= 0.8x; site/etcd >= 1.0x at 16 proposers, >= 0.7x at 1")
    for name, f in (("site", failover), ("tcp", tcp_failover), ("etcd", (etcd or {}).get("failover") or {})):
        if f:
            print(
                f"failover {name} ({f['trials']} leader kills): "
                f"new leader median {f['elected_median_s']:.3f} s, "
                f"max {f['elected_max_s']:.3f} s; first commit median {f['committed_median_s']:.3f} s, "
                f"max {f['committed_max_s']:.3f} s = {f['ratio_median']:.2f} / {f['ratio_max']:.2f} x "
                f"election_max_s ({f['election_max_s']} s; goal median <= 1.5)"
            )
            print(f"  per trial: {f['committed_all_s']}")

    def level_of(system: str, level: int, key: str) -> float | None:
        f = figures.get(system, {}).get(level)
        return f.summary()[key] if f is not None and f.latencies_s else None

    site16 = figures.get("site", {}).get(16)
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
        "failover_median_s": failover.get("committed_median_s"),
        "failover_max_s": failover.get("committed_max_s"),
        "etcd_failover_median_s": ((etcd or {}).get("failover") or {}).get("committed_median_s"),
        "journal_flushes_per_commit_16": (
            site16.extra.get("journal_flushes", 0) / len(site16.latencies_s)
            if site16 is not None and site16.latencies_s
            else None
        ),
    }
    for system in ("site", "raw", "tcp", "etcd"):
        prefix = "" if system == "site" else f"{system}_"
        for level in (1, 16):
            result[f"{prefix}median_ms_{level}"] = level_of(system, level, "median_ms")
            result[f"{prefix}p99_ms_{level}"] = level_of(system, level, "p99_ms")
            result[f"{prefix}cpu_ms_per_commit_{level}"] = level_of(system, level, "cpu_ms_per_commit")
    etcd16 = (etcd or {}).get("figures", {}).get(16)
    result["etcd_wal_fsyncs_per_put_16"] = (
        etcd16.extra["wal_fsyncs"] / len(etcd16.latencies_s)
        if etcd16 is not None and etcd16.latencies_s
        else None
    )
    result["failover_elected_median_s"] = failover.get("elected_median_s")
    result["failover_ratio_median"] = failover.get("ratio_median")
    result["tcp_failover_median_s"] = tcp_failover.get("committed_median_s")
    result["etcd_failover_max_s"] = ((etcd or {}).get("failover") or {}).get("committed_max_s")
    return result


async def bench(run: Run, timings: RaftTimings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-consensus-") as tmp:
        root = Path(tmp)
        fleet = await asyncio.to_thread(LocalFleet, root / "fleet")
        fm = tcp = None
        failover: dict[str, Any] = {}
        tcp_failover: dict[str, Any] = {}
        try:
            if {"site", "raw"} & set(run.systems):
                fm = Fleetmesh(root / "fleetmesh", fleet, timings)
                await fm.open(run.systems)
            if "tcp" in run.systems:
                trusted = load_trusted_keys(fleet.node_credentials("node-0").directory)
                tcp = Tcp(root / "tcp", timings, trusted)
                tcp.open()
            figures = await measure_commits(run, fm, tcp)
            if run.trials and fm is not None and "site" in run.systems:
                failover = await failover_site(fm, run.trials)
            if run.trials and tcp is not None:
                tcp_failover = await failover_tcp(tcp, run.trials)
        finally:
            if fm is not None:
                await fm.close()
            if tcp is not None:
                await tcp.close()
        etcd = await measure_etcd(run, root, timings) if run.against == "etcd" else None
        return report(run, timings, figures, failover, tcp_failover, etcd)


def parse_args(argv: list[str] | None) -> tuple[Run, argparse.Namespace]:
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
        "--systems", default=",".join(SYSTEMS), help="which of site,raw,tcp to run (default: all three)"
    )
    parser.add_argument("--against", choices=["etcd"], help="also run etcd 3.4 (Debian's etcd-server) alike")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: few commits, 2 failover trials (~20 s)"
    )
    args = parser.parse_args(argv)
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
        return Run(commits=60, blocks=1, levels=levels, trials=2, systems=systems, against=args.against), args
    return Run(
        commits=args.commits,
        blocks=args.blocks,
        levels=levels,
        trials=args.trials,
        systems=systems,
        against=args.against,
    ), args


def main(argv: list[str] | None = None) -> int:
    run, _ = parse_args(argv)
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
