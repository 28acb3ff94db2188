"""One harness for real Raft groups on loopback: n members of one group, each with its own data dir,
that start, stop and restart in place, and the waits every consensus test needs (one leader known
by all, every member caught up and agreeing).

`RaftCluster` runs bare `RaftGroup`s over a tiny state machine (`EntryLog`) for tests of the Raft
layer; `SiteCluster` runs `SiteGroup`s (the decision ledger, the guard and the audit log) for tests
of a site's decisions. Both are the same `Cluster`: member i is ``node-i`` at ``addresses[i]`` with
data dir ``root/node-i``. Everything here goes through the groups' public interfaces.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Generic, TypeVar

from mesh.consensus.group import SiteGroup
from mesh.consensus.raft import RaftGroup, RaftTimings, derive_group_password
from mesh.guard.core import Decision, DecisionKind, Limits, Policy, StreamMove
from mesh.identity.ca import load_group_secret, load_trusted_keys
from mesh.identity.signing import KeyRole, SigningKey
from mesh.node.local import LocalFleet, free_address, wait_for

FLEET_SECRET = bytes(range(32))
PASSWORD = derive_group_password(FLEET_SECRET, "site-test")
TIMINGS = RaftTimings()

Member = TypeVar("Member", RaftGroup, SiteGroup)


def raft_of(member: RaftGroup | SiteGroup) -> RaftGroup:
    """The Raft member under a harness member (a SiteGroup's `raft`, or the RaftGroup itself)."""
    return member.raft if isinstance(member, SiteGroup) else member


class Cluster(Generic[Member]):
    """n members of one Raft group on loopback; members stop and restart in place from their data dirs."""

    def __init__(self, root: Path, n: int, timings: RaftTimings | None = None) -> None:
        self.root = root
        self.timings = timings or TIMINGS
        self.addresses = [free_address() for _ in range(n)]
        self.groups: dict[str, Member] = {}

    # -- membership of the harness --

    def name(self, i: int) -> str:
        return f"node-{i}"

    def add_address(self) -> int:
        """Reserve an address for one more member (dynamic membership); returns its index."""
        self.addresses.append(free_address())
        return len(self.addresses) - 1

    def _build(self, i: int, data_dir: Path, **options: object) -> Member:
        raise NotImplementedError

    def start(self, i: int, **options: object) -> Member:
        """Start (or restart from its data dir) member i; options go to the member's constructor."""
        member = self._build(i, self.root / self.name(i), **options)
        self.groups[self.name(i)] = member
        return member

    def start_all(self) -> list[Member]:
        return [self.start(i) for i in range(len(self.addresses))]

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
                raft_of(m).leader_address == raft_of(leaders[0]).address for m in among
            )

        names = [raft_of(m).address for m in among]
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
    """Bare RaftGroups replicating an EntryLog, all with the same password unless told otherwise."""

    def _build(
        self, i: int, data_dir: Path, *, password: str = PASSWORD, partners: Sequence[str] | None = None
    ) -> RaftGroup:
        return RaftGroup(
            self.addresses[i],
            partners or self.addresses,
            EntryLog(),
            data_dir=data_dir,
            password=password,
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

    def __init__(self, root: Path, fleet: LocalFleet, n: int, timings: RaftTimings | None = None) -> None:
        super().__init__(root, n, timings)
        creds = fleet.node_credentials("node-0").directory
        self.secret = load_group_secret(creds)
        self.trusted = load_trusted_keys(creds)
        self.trusted.add(NODE_KEY.verify_key)

    def _build(self, i: int, data_dir: Path) -> SiteGroup:
        return SiteGroup(
            self.name(i),
            address=self.addresses[i],
            members=self.addresses,
            group=GROUP,
            data_dir=data_dir,
            fleet_secret=self.secret,
            trusted=self.trusted,
            policy=POLICY,
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
