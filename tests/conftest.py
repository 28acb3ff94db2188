"""Shared fixtures: a fleet CA for the session and real in-process clusters."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# gRPC core logs every GOAWAY of a stopped test node at INFO; keep failures readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import pytest
import pytest_asyncio
from hypothesis import settings

from mesh.membership.config import MembershipConfig
from mesh.node.local import FAST_TIMINGS, LocalCluster, LocalFleet

# Hypothesis's per-example deadline measures the machine, not the code: on a busy 2-core machine a
# first example (imports, caches) can take 400 ms. Properties are checked; speed is for bench/.
settings.register_profile("fleetmesh", deadline=None)
settings.load_profile("fleetmesh")


@pytest.fixture(scope="session")
def fleet(tmp_path_factory) -> LocalFleet:
    return LocalFleet(tmp_path_factory.mktemp("fleet"))


@pytest_asyncio.fixture
async def cluster(fleet, tmp_path):
    """Factory: `await cluster(n=10, sites=3)` starts n real nodes; all are stopped at the end."""
    made: list[LocalCluster] = []

    async def make(n: int, sites: int = 1, timings: MembershipConfig = FAST_TIMINGS, seed: int = 0,
                   pools: str = "flat", representatives: int | None = None, **sections):
        c = LocalCluster(fleet, tmp_path / f"cluster{len(made)}", timings, seed=seed, sections=sections,
                         pools=pools, representatives=representatives)
        made.append(c)
        return await c.start(n, sites)

    yield make
    for c in made:
        await c.close()


@pytest.fixture
def tiny_disk(tmp_path):
    """Factory: `tiny_disk(size_kib)` mounts a real tmpfs that small and returns its mount point, so
    writers meet ENOSPC from the kernel (partial writes included). Unmounted after the test. Skips
    where mounting is not allowed (CI and these machines run as root; a laptop may not)."""
    mounted: list[Path] = []

    def mount(size_kib: int) -> Path:
        mount_point = tmp_path / f"tiny{len(mounted)}"
        mount_point.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount_point)]
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the injected-failure tests "
                        "(/dev/full) cover the same code paths")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)
