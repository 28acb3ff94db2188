"""Shared fixtures: a fleet CA for the session and real in-process clusters."""

from __future__ import annotations

import os

# gRPC core logs every GOAWAY of a stopped test node at INFO; keep failures readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import pytest
import pytest_asyncio

from mesh.membership.config import MembershipConfig
from mesh.node.local import FAST_TIMINGS, LocalCluster, LocalFleet


@pytest.fixture(scope="session")
def fleet(tmp_path_factory) -> LocalFleet:
    return LocalFleet(tmp_path_factory.mktemp("fleet"))


@pytest_asyncio.fixture
async def cluster(fleet, tmp_path):
    """Factory: `await cluster(n=10, sites=3)` starts n real nodes; all are stopped at the end."""
    made: list[LocalCluster] = []

    async def make(n: int, sites: int = 1, timings: MembershipConfig = FAST_TIMINGS, seed: int = 0,
                   **sections):
        c = LocalCluster(fleet, tmp_path / f"cluster{len(made)}", timings, seed=seed, sections=sections)
        made.append(c)
        return await c.start(n, sites)

    yield make
    for c in made:
        await c.close()
