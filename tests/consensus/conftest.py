"""Fixtures of the consensus tests: factories of real Raft clusters on loopback (see harness.py),
stopped at the end of each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from mesh.consensus.raft import RaftTimings
from mesh.identity.signing import KeyRole, SigningKey, load_signing_key
from mesh.node.local import LocalFleet
from tests.consensus.harness import TIMINGS, RaftCluster, SiteCluster


@pytest_asyncio.fixture
async def raft_cluster(tmp_path) -> AsyncIterator[Callable[..., RaftCluster]]:
    """Factory: `raft_cluster(3)` makes 3 RaftGroup members (not started) of one group."""
    made: list[RaftCluster] = []

    def make(n: int, timings: RaftTimings = TIMINGS) -> RaftCluster:
        c = RaftCluster(tmp_path / f"cluster{len(made)}", n, timings)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close_all()


@pytest_asyncio.fixture
async def site(tmp_path, fleet: LocalFleet) -> AsyncIterator[Callable[..., SiteCluster]]:
    """Factory: `site(3)` makes 3 SiteGroup members (not started) of site GROUP."""
    made: list[SiteCluster] = []

    def make(n: int, timings: RaftTimings | None = None) -> SiteCluster:
        s = SiteCluster(tmp_path / f"site{len(made)}", fleet, n, timings)
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close_all()


@pytest.fixture(scope="module")
def operator_key(fleet: LocalFleet) -> SigningKey:
    return load_signing_key(fleet.directory / "operator.key", KeyRole.OPERATOR)
