"""One harness for real Raft groups on loopback: n members of one group, each with its own data dir,
that start, stop and restart in place, and the waits every consensus test needs (one leader known
by all, every member caught up and agreeing).

`RaftCluster` runs bare `RaftGroup`s over a tiny state machine (`EntryLog`) for tests of the Raft
layer; `SiteCluster` runs `SiteGroup`s (the decision ledger, the guard and the audit log) for tests
of a site's decisions. Both are the same `Cluster`: member i is node ``node-i`` with data dir
``root/node-i`` and its own `Endpoint`: a gRPC server with node-i's fleet certificate and the
Raft service, as a node's port would be. Members talk over mTLS exactly as in a node; an
endpoint outlives its member's restarts. Everything here goes through public interfaces.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Generic, TypeVar

import grpc

from mesh._proto import raft_pb2_grpc
from mesh.consensus.group import SiteGroup
from mesh.consensus.raft import RaftGroup, RaftTimings
from mesh.consensus.transport import RaftLink, RaftServicer
from mesh.guard.core import Decision, DecisionKind, Limits, Policy, StreamMove
from mesh.identity.ca import Credentials, load_trusted_keys
from mesh.identity.signing import KeyRole, SigningKey
from mesh.identity.tls import server_credentials
from mesh.node.local import LocalFleet, wait_for
from mesh.node.peers import PeerChannels

TIMINGS = RaftTimings()
RAFT_GROUP = "site-test"

Member = TypeVar("Member", RaftGroup, SiteGroup)


def raft_of(member: RaftGroup | SiteGroup) -> RaftGroup:
    """The Raft member under a harness member (a SiteGroup's `raft`, or the RaftGroup itself)."""
    return member.raft if isinstance(member, SiteGroup) else member


class Endpoint:
    """A member's node gRPC port: a server on loopback with the node's certificate and the Raft
    service, and the node's mTLS channels to its peers."""

    def __init__(self, credentials: Credentials, port: int = 0) -> None:
        self.credentials = credentials
        self.servicer = RaftServicer()
        self.channels = PeerChannels(credentials)
        # No SO_REUSEPORT: a port served again after `Cluster.stop_endpoint` must be this one's alone.
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        wanted = port
        try:
            port = self.server.add_secure_port(f"127.0.0.1:{port}", server_credentials(credentials))
        except RuntimeError:
            port = 0
        if wanted and port != wanted:
            raise RuntimeError(f"port {wanted} was taken while its endpoint was down; rerun the test")
        self.address = f"127.0.0.1:{port}"
        raft_pb2_grpc.add_RaftServicer_to_server(self.servicer, self.server)

    async def close(self) -> None:
        await self.server.stop(0)
        await self.channels.close()


class Cluster(Generic[Member]):
    """n members of one Raft group on loopback; members stop and restart in place from their data dirs.
    Build it with `await Cluster.open(...)` (the members' endpoints start serving)."""

    def __init__(self, root: Path, fleet: LocalFleet, n: int, timings: RaftTimings | None = None,
                 group: str = RAFT_GROUP) -> None:
        self.root = root
        self.fleet = fleet
        self.timings = timings or TIMINGS
        self.group = group
        self.names = [self.name(i) for i in range(n)]
        self.endpoints: dict[str, Endpoint] = {}
        self.groups: dict[str, Member] = {}

    async def open(self) -> Cluster[Member]:
        for name in self.names:
            await self.add_endpoint(name)
        return self

    async def add_endpoint(self, name: str, port: int = 0) -> Endpoint:
        """Start the gRPC port of node `name` (its certificate is enrolled on first use)."""
        endpoint = Endpoint(self.fleet.node_credentials(name), port)
        await endpoint.server.start()
        self.endpoints[name] = endpoint
        return endpoint

    async def stop_endpoint(self, name: str) -> int:
        """Close node `name`'s gRPC port and channels, as its process exiting does (the peers' streams
        to it break and re-dial with back-off); returns the port for `add_endpoint` to serve again.
        Close the member first: its link belongs to this endpoint."""
        endpoint = self.endpoints.pop(name)
        await endpoint.close()
        return int(endpoint.address.rsplit(":", 1)[1])

    # -- membership of the harness --

    def name(self, i: int) -> str:
        return f"node-{i}"

    async def add_name(self) -> int:
        """One more member's endpoint (dynamic membership); returns its index."""
        self.names.append(self.name(len(self.names)))
        await self.add_endpoint(self.names[-1])
        return len(self.names) - 1

    def link(self, name: str, group: str | None = None) -> RaftLink:
        """A Raft link for member `name`, dialling its peers' endpoints from its own."""
        endpoint = self.endpoints[name]

        def dial(peer: str) -> raft_pb2_grpc.RaftStub | None:
            target = self.endpoints.get(peer)
            if target is None:
                return None
            return raft_pb2_grpc.RaftStub(endpoint.channels.channel(target.address, peer))

        link = RaftLink(group=group or self.group, node_id=name, dial=dial, rng=random.Random(name))
        endpoint.servicer.add(link)
        return link

    def _build(self, i: int, data_dir: Path, **options: object) -> Member:
        raise NotImplementedError

    def start(self, i: int, **options: object) -> Member:
        """Start (or restart from its data dir) member i; options go to the member's constructor."""
        member = self._build(i, self.root / self.name(i), **options)
        self.groups[self.name(i)] = member
        return member

    def start_all(self) -> list[Member]:
        return [self.start(i) for i in range(len(self.names))]

    def live(self) -> list[Member]:
        """Members whose Raft tick thread still runs (not closed)."""
        return [m for m in self.groups.values() if raft_of(m).tick_thread_alive()]

    # -- waits --

    def leader(self) -> Member | None:
        """The one live member that believes it leads, or None (no leader, or two during a change)."""
        leaders = [m for m in self.live() if raft_of(m).is_leader]
        return leaders[0] if len(leaders) == 1 else None

    async def wait_leader(self, among: Sequence[Member] | None = None, timeout_s: float = 10.0) -> Member:
        """Wait until exactly one member of `among` leads and every member of `among` knows it."""
        among = list(among) if among is not None else self.live()

        def one_leader_known_by_all() -> bool:
            leaders = [m for m in among if raft_of(m).is_leader]
            return len(leaders) == 1 and all(
                raft_of(m).leader_id == raft_of(leaders[0]).node_id for m in among
            )

        names = [raft_of(m).node_id for m in among]
        await wait_for(one_leader_known_by_all, timeout_s, f"one leader known by {names}")
        return next(m for m in among if raft_of(m).is_leader)

    async def caught_up(self, among: Sequence[Member] | None = None, timeout_s: float = 10.0) -> Member:
        """Wait until every member of `among` has applied everything committed; return the leader."""
        among = list(among) if among is not None else self.live()
        leader = await self.wait_leader(among, timeout_s)
        await raft_of(leader).read_barrier(timeout_s)
        target = raft_of(leader).raftCommitIndex
        await wait_for(
            lambda: all(raft_of(m).applied_index >= target for m in among),
            timeout_s,
            f"all members applied index {target}",
        )
        return leader

    # -- stopping --

    async def close(self, member: Member) -> None:
        await member.close()

    async def close_all_at_once(self) -> None:
        """Every member stops in the same tick period, as in a site losing power."""
        live = self.live()
        for m in live:
            raft_of(m).destroy()
        await asyncio.gather(*(self.close(m) for m in live))

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(m) for m in self.live()))

    async def shutdown(self) -> None:
        """Every member, then every endpoint."""
        await self.close_all()
        await asyncio.gather(*(e.close() for e in self.endpoints.values()), return_exceptions=True)


# --- bare Raft groups -----------------------------------------------------------------------------------


class EntryLog:
    """Tiny state machine: an append-only list; apply returns the entry's position."""

    def __init__(self) -> None:
        self.entries: list[bytes] = []

    def apply(self, command: bytes) -> int:
        if command == b"boom":
            raise ValueError("boom is not a valid entry")
        self.entries.append(command)
        return len(self.entries) - 1

    def snapshot(self) -> bytes:
        return b"".join(len(e).to_bytes(4, "big") + e for e in self.entries)

    def restore(self, data: bytes) -> None:
        entries, i = [], 0
        while i < len(data):
            n = int.from_bytes(data[i : i + 4], "big")
            entries.append(data[i + 4 : i + 4 + n])
            i += 4 + n
        self.entries = entries


class RaftCluster(Cluster[RaftGroup]):
    """Bare RaftGroups replicating an EntryLog."""

    def _build(
        self, i: int, data_dir: Path, *, partners: Sequence[str] | None = None, group: str | None = None
    ) -> RaftGroup:
        name = self.name(i)
        return RaftGroup(
            name,
            partners or self.names,
            EntryLog(),
            data_dir=data_dir,
            link=self.link(name, group),
            timings=self.timings,
        )

    async def converged(
        self, among: Sequence[RaftGroup] | None = None, timeout_s: float = 10.0
    ) -> list[bytes]:
        """Wait until every member has applied the same entries; return them."""
        among = list(among) if among is not None else self.live()
        await self.caught_up(among, timeout_s)
        logs = [entries(g) for g in among]
        assert all(log[: len(logs[0])] == logs[0][: len(log)] for log in logs), "members diverged"
        return max(logs, key=len)


def entries(group: RaftGroup) -> list[bytes]:
    """What a RaftCluster member has applied."""
    state = group.state
    assert isinstance(state, EntryLog)
    return state.entries


# --- site groups: the decision ledger behind the guard -------------------------------------------------

GROUP = "site-a"
POLICY = Policy(
    limits={DecisionKind.MOVE_STREAMS: Limits(max_nodes=2, max_fraction=1.0, max_streams=3)}, hold_ttl_s=600.0
)
NODE_KEY = SigningKey.generate(KeyRole.NODE)
ROUTES = {f"cam-{i}": f"node-{1 + i // 3}" for i in range(9)}  # cam-0..2 on node-1, 3..5 on node-2, ...


class SiteCluster(Cluster[SiteGroup]):
    """SiteGroups of one site (group GROUP, policy POLICY) with the fleet's credentials; NODE_KEY is
    trusted, but only as a node key."""

    def __init__(
        self,
        root: Path,
        fleet: LocalFleet,
        n: int,
        timings: RaftTimings | None = None,
        policy: Policy = POLICY,
    ) -> None:
        super().__init__(root, fleet, n, timings, group=GROUP)
        self.policy = policy
        creds = fleet.node_credentials("node-0").directory
        self.trusted = load_trusted_keys(creds)
        self.trusted.add(NODE_KEY.verify_key)

    def _build(self, i: int, data_dir: Path) -> SiteGroup:
        name = self.name(i)
        return SiteGroup(
            name,
            members=self.names,
            group=GROUP,
            data_dir=data_dir,
            link=self.link(name),
            trusted=self.trusted,
            policy=self.policy,
            timings=self.timings,
        )

    async def converged(self, among: Sequence[SiteGroup] | None = None, timeout_s: float = 10.0) -> None:
        """Every member of `among` has applied all that is committed, and their states agree."""
        among = list(among) if among is not None else self.live()
        await self.caught_up(among, timeout_s)
        assert len({g.state_digest() for g in among}) == 1, "replicas diverged"


def move(*moves: tuple[str, str, str], nonce: str, proposer: str = "node-1") -> Decision:
    return Decision(
        kind=DecisionKind.MOVE_STREAMS,
        group=GROUP,
        proposer=proposer,
        reason="node-1 is overloaded",
        proposed_at=time.time(),
        nonce=nonce,
        moves=tuple(StreamMove(*m) for m in moves),
    )


def small(nonce: str = "small-0001") -> Decision:
    return move(("cam-0", "node-1", "node-2"), nonce=nonce)  # 2 nodes, 1 stream: within scope


def big(nonce: str = "big-000001") -> Decision:
    """4 streams over 3 nodes: above the move_streams scope."""
    return move(
        ("cam-1", "node-1", "node-4"),
        ("cam-2", "node-1", "node-4"),
        ("cam-3", "node-2", "node-4"),
        ("cam-4", "node-2", "node-4"),
        nonce=nonce,
        proposer="node-3",
    )
