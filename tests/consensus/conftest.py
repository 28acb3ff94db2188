"""Fixtures of the consensus tests: factories of real Raft clusters on loopback (see harness.py),
stopped at the end of each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from mesh.consensus.raft import RaftTimings
from mesh.identity.signing import KeyRole, SigningKey, load_signing_key
from mesh.node.local import LocalFleet
from tests.consensus.harness import TIMINGS, RaftCluster, SiteCluster


@pytest_asyncio.fixture
async def raft_cluster(tmp_path, fleet: LocalFleet) -> AsyncIterator[Callable[..., Awaitable[RaftCluster]]]:
    """Factory: `await raft_cluster(3)` makes 3 RaftGroup members (endpoints serving, members not
    started) of one group."""
    made: list[RaftCluster] = []

    async def make(n: int, timings: RaftTimings = TIMINGS) -> RaftCluster:
        c = RaftCluster(tmp_path / f"cluster{len(made)}", fleet, n, timings)
        made.append(c)
        return await c.open()

    yield make
    for c in made:
        await c.shutdown()


@pytest_asyncio.fixture
async def site(tmp_path, fleet: LocalFleet) -> AsyncIterator[Callable[..., Awaitable[SiteCluster]]]:
    """Factory: `await site(3)` makes 3 SiteGroup members (endpoints serving, members not started)
    of site GROUP."""
    made: list[SiteCluster] = []

    async def make(n: int, timings: RaftTimings | None = None) -> SiteCluster:
        s = SiteCluster(tmp_path / f"site{len(made)}", fleet, n, timings)
        made.append(s)
        await s.open()
        return s

    yield make
    for s in made:
        await s.shutdown()


@pytest.fixture(scope="module")
def operator_key(fleet: LocalFleet) -> SigningKey:
    return load_signing_key(fleet.directory / "operator.key", KeyRole.OPERATOR)
