"""Nemeses: faults applied to the cluster from outside the nodes, each with apply, heal and a description.

A nemesis resolves its targets when it is applied (the Raft leader is whoever leads then),
using the run's seeded `random.Random`, and returns what it did, which goes into the run's
history. Network faults are contributions to one `FaultBook` that renders the bridge's nft
ruleset from every active fault at once, so overlapping faults compose.

What each one does:

- Partition: nft drop rules on the bridge. Modes: `one` (a random node isolated), `halves`,
  `leader` (a site's Raft leader isolated), `leader-minority` (a site split with its leader
  on the smaller side), `majorities-ring`, `bridge`, `site` (a whole site cut off from the
  others), `asymmetric` (a node stops hearing the others, which still hear it).
- Flapping: a partition switched on and off every `period_s`.
- PacketLoss: nft `numgen random` drops a percentage of a node's packets, both ways.
- Bandwidth: `tc tbf` on both ends of a node's link.
- Latency: the user-space delay proxy in front of a node's ports adds `delay_ms` each way.
- Kill: SIGKILL one node, the leader, a quorum or a whole site; heal restarts them.
- Pause: SIGSTOP, heal SIGCONT. Restart: SIGKILL (or SIGTERM) and start again at once.
- ClockSkew: the node restarts with its wall clock offset (libfaketime); heal restarts it
  on true time. ClockJump: the offset changes under a running node (libfaketime moves its
  monotonic clock too: see README).
- DiskFull: fills the node's tmpfs data dir; heal deletes the filler.
- Corrupt: flips a bit in (or truncates) a stored model or the node's audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from chaos import faults
from chaos.cluster import Cluster
from chaos.net import Network


class NemesisError(Exception):
    """A nemesis cannot run in this cluster (no such node kind, nothing to corrupt)."""


class World(Protocol):
    """What a nemesis may use: the cluster, the fault book, and lookups (its draws are its own `rng`)."""

    cluster: Cluster
    book: FaultBook

    async def leader(self, site: str) -> str | None: ...

    def mark_tampered(self, node: str) -> None: ...


@dataclass
class FaultBook:
    """Active network faults by nemesis, rendered together into one nft ruleset."""

    network: Network
    drops: dict[str, frozenset[tuple[str, str]]] = field(default_factory=dict)
    losses: dict[str, dict[tuple[str, str], int]] = field(default_factory=dict)

    async def set(
        self,
        key: str,
        *,
        drops: frozenset[tuple[str, str]] = frozenset(),
        losses: dict[tuple[str, str], int] | None = None,
    ) -> None:
        self.drops[key] = drops
        self.losses[key] = dict(losses or {})
        await self.sync()

    async def clear(self, key: str) -> None:
        self.drops.pop(key, None)
        self.losses.pop(key, None)
        await self.sync()

    async def sync(self) -> None:
        drops = frozenset().union(*self.drops.values()) if self.drops else frozenset()
        losses: dict[tuple[str, str], int] = {}
        for per in self.losses.values():
            for pair, pct in per.items():
                losses[pair] = max(losses.get(pair, 0), pct)
        await asyncio.to_thread(self.network.set_faults, drops, losses)


class Nemesis:
    """Base: `kind` names it in reports; `describe()` says what it will do before it runs."""

    kind = "nemesis"

    def __init__(self) -> None:
        self.key = ""  # unique within a run; set by the schedule
        # Its own draws, seeded by the schedule from the run's seed and its key: what one nemesis draws
        # (or whether a lookup it makes answers) changes nothing another draws, so a seed replays.
        self.rng = random.Random(0)

    def describe(self) -> str:
        raise NotImplementedError

    async def apply(self, world: World) -> dict[str, Any]:
        raise NotImplementedError

    async def heal(self, world: World) -> dict[str, Any]:
        return {}


class NoFault(Nemesis):
    """Nothing at all, for control runs: the same tooling and timeline without a fault."""

    kind = "no-fault"

    def describe(self) -> str:
        return "no fault (control run)"

    async def apply(self, world: World) -> dict[str, Any]:
        return {}


def _pick_site(world: World, rng: random.Random, site: str | None) -> str:
    return site or rng.choice(world.cluster.plan.site_names)


async def _target(world: World, rng: random.Random, target: str, site: str | None) -> list[str]:
    """Nodes named by `target`: one (random), leader (of a site), quorum (a majority of a
    site), site (all of a site), minority (the largest minority of a site)."""
    plan = world.cluster.plan
    if target == "one":
        pool = plan.site_members(site) if site else plan.ids
        return [rng.choice(pool)]
    chosen_site = _pick_site(world, rng, site)
    members = plan.site_members(chosen_site)
    if target == "leader":
        fallback = rng.choice(members)  # drawn either way: whether a leader answers changes no later draw
        return [await world.leader(chosen_site) or fallback]
    if target == "quorum":
        return sorted(rng.sample(members, len(members) // 2 + 1))
    if target == "minority":
        return sorted(rng.sample(members, (len(members) - 1) // 2))
    if target == "site":
        return list(members)
    raise NemesisError(f"unknown target {target!r} (one, leader, quorum, minority, site)")


class Partition(Nemesis):
    MODES = ("one", "halves", "leader", "leader-minority", "majorities-ring", "bridge", "site", "asymmetric")

    def __init__(self, mode: str, site: str | None = None) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise NemesisError(f"unknown partition mode {mode!r}; one of {', '.join(self.MODES)}")
        self.mode = mode
        self.site = site
        self.kind = f"partition-{mode}"
        self.grudges: frozenset[tuple[str, str]] = frozenset()

    def describe(self) -> str:
        where = f"site {self.site}" if self.site else "the cluster"
        return {
            "one": f"isolate one random node of {where}",
            "halves": f"split {where} into random halves",
            "leader": f"isolate the Raft leader of {self.site or 'a random site'}",
            "leader-minority": f"split {self.site or 'a random site'} 2|3-style with its Raft leader on the "
            "smaller side",
            "majorities-ring": f"majorities ring over {where}: each node hears a different majority",
            "bridge": f"two halves of {where} that hear only one bridge node",
            "site": f"cut {self.site or 'a random site'} off from the other sites",
            "asymmetric": f"one node of {where} stops hearing the others (they still hear it)",
        }[self.mode]

    async def plan(self, world: World) -> dict[str, Any]:
        plan, rng = world.cluster.plan, self.rng
        scope = plan.site_members(self.site) if self.site else plan.ids
        if self.mode == "one":
            node = rng.choice(scope)
            return {"grudges": faults.isolate(node, plan.ids), "isolated": [node]}
        if self.mode == "halves":
            grudges, sides = faults.halves(scope, rng)
            return {"grudges": grudges, "sides": sides}
        if self.mode in ("leader", "leader-minority"):
            site = _pick_site(world, rng, self.site)
            members = plan.site_members(site)
            fallback = rng.choice(members)  # drawn either way: whether a leader answers changes no later draw
            leader = await world.leader(site)
            known = leader is not None
            leader = leader or fallback
            if self.mode == "leader":
                return {
                    "grudges": faults.isolate(leader, plan.ids),
                    "isolated": [leader],
                    "site": site,
                    "leader": leader,
                    "leader_known": known,
                }
            grudges, sides = faults.minority_with(members, leader, (len(members) - 1) // 2, rng)
            return {"grudges": grudges, "sides": sides, "site": site, "leader": leader, "leader_known": known}
        if self.mode == "majorities-ring":
            return {"grudges": faults.majorities_ring(scope, rng)}
        if self.mode == "bridge":
            grudges, shape = faults.bridge(scope, rng)
            return {"grudges": grudges, **shape}
        if self.mode == "site":
            if len(plan.site_names) < 2:
                raise NemesisError("a site partition needs at least two sites")
            site = _pick_site(world, rng, self.site)
            inside = plan.site_members(site)
            return {"grudges": faults.cut(inside, [n for n in plan.ids if n not in inside]), "site": site}
        node = rng.choice(scope)
        return {"grudges": faults.one_way([node], [n for n in plan.ids if n != node]), "deaf": node}

    async def apply(self, world: World) -> dict[str, Any]:
        planned = await self.plan(world)
        self.grudges = planned.pop("grudges")
        await world.book.set(self.key, drops=self.grudges)
        return {**planned, "dropped_pairs": len(self.grudges)}

    async def heal(self, world: World) -> dict[str, Any]:
        await world.book.clear(self.key)
        return {}


class Flapping(Nemesis):
    def __init__(self, inner: Partition, period_s: float = 3.0) -> None:
        super().__init__()
        self.inner = inner
        self.period_s = period_s
        self.kind = f"flapping-{inner.mode}"
        self._task: asyncio.Task | None = None
        self.toggles = 0

    def describe(self) -> str:
        return f"flapping every {self.period_s:g}s: {self.inner.describe()}"

    async def apply(self, world: World) -> dict[str, Any]:
        planned = await self.inner.plan(world)
        grudges = planned.pop("grudges")

        async def flap() -> None:
            on = True
            while True:
                if on:
                    await world.book.set(self.key, drops=grudges)
                else:
                    await world.book.clear(self.key)
                self.toggles += 1
                on = not on
                await asyncio.sleep(self.period_s)  # the flapping period itself

        self._task = asyncio.create_task(flap(), name=f"flap-{self.key}")
        return {**planned, "dropped_pairs": len(grudges), "period_s": self.period_s}

    async def heal(self, world: World) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await world.book.clear(self.key)
        return {"toggles": self.toggles}


class PacketLoss(Nemesis):
    kind = "packet-loss"

    def __init__(self, percent: int = 30, everywhere: bool = False) -> None:
        super().__init__()
        self.percent = percent
        self.everywhere = everywhere

    def describe(self) -> str:
        return f"drop {self.percent}% of packets " + (
            "between every pair of nodes" if self.everywhere else "to and from one random node"
        )

    async def apply(self, world: World) -> dict[str, Any]:
        ids = world.cluster.plan.ids
        if self.everywhere:
            pairs = {(a, b): self.percent for a in ids for b in ids if a != b}
            await world.book.set(self.key, losses=pairs)
            return {"pairs": len(pairs), "percent": self.percent}
        node = self.rng.choice(ids)
        pairs = {}
        for other in ids:
            if other != node:
                pairs[(node, other)] = pairs[(other, node)] = self.percent
        await world.book.set(self.key, losses=pairs)
        return {"node": node, "percent": self.percent}

    async def heal(self, world: World) -> dict[str, Any]:
        await world.book.clear(self.key)
        return {}


class Bandwidth(Nemesis):
    kind = "bandwidth"

    def __init__(self, rate_kbit: int = 256) -> None:
        super().__init__()
        self.rate_kbit = rate_kbit
        self.node: str | None = None

    def describe(self) -> str:
        return f"limit one random node's link to {self.rate_kbit} kbit/s each way (tc tbf)"

    async def apply(self, world: World) -> dict[str, Any]:
        self.node = self.rng.choice(world.cluster.plan.ids)
        await asyncio.to_thread(world.cluster.network.limit_bandwidth, self.node, self.rate_kbit)
        return {"node": self.node, "rate_kbit": self.rate_kbit}

    async def heal(self, world: World) -> dict[str, Any]:
        if self.node:
            await asyncio.to_thread(world.cluster.network.clear_bandwidth, self.node)
        return {}


class Latency(Nemesis):
    kind = "latency"

    def __init__(self, delay_ms: int = 300) -> None:
        super().__init__()
        self.delay_ms = delay_ms
        self.node: str | None = None

    def describe(self) -> str:
        return (
            f"add {self.delay_ms} ms each way to every connection of one node with other nodes "
            "(user-space proxy)"
        )

    async def apply(self, world: World) -> dict[str, Any]:
        candidates = sorted(world.cluster.plan.delay_nodes)
        if not candidates:
            raise NemesisError(
                "latency needs a node started behind the delay proxy (ClusterPlan.delay_nodes)"
            )
        self.node = self.rng.choice(candidates)
        world.cluster.delay_file(self.node).write_text(f"{self.delay_ms}\n")
        return {"node": self.node, "delay_ms": self.delay_ms}

    async def heal(self, world: World) -> dict[str, Any]:
        if self.node:
            world.cluster.delay_file(self.node).write_text("0\n")
        return {}


class Kill(Nemesis):
    def __init__(self, target: str = "one", site: str | None = None, restart: bool = True) -> None:
        super().__init__()
        self.target = target
        self.site = site
        self.restart = restart
        self.kind = f"kill-{target}"
        self.nodes: list[str] = []

    def describe(self) -> str:
        return f"SIGKILL {self.target} ({self.site or 'any site'})" + (
            "; restart on heal" if self.restart else ""
        )

    async def apply(self, world: World) -> dict[str, Any]:
        self.nodes = await _target(world, self.rng, self.target, self.site)
        for node in self.nodes:
            proc = world.cluster.procs[node]
            proc.expected_down = True
            await asyncio.to_thread(proc.kill)
        return {"nodes": self.nodes}

    async def heal(self, world: World) -> dict[str, Any]:
        if self.restart:
            for node in self.nodes:
                world.cluster.procs[node].start()
        return {"restarted": self.nodes if self.restart else []}


class Pause(Nemesis):
    def __init__(self, target: str = "one", site: str | None = None) -> None:
        super().__init__()
        self.target = target
        self.site = site
        self.kind = f"pause-{target}"
        self.nodes: list[str] = []

    def describe(self) -> str:
        return f"SIGSTOP {self.target} ({self.site or 'any site'}), SIGCONT on heal"

    async def apply(self, world: World) -> dict[str, Any]:
        self.nodes = await _target(world, self.rng, self.target, self.site)
        for node in self.nodes:
            world.cluster.procs[node].pause()
        return {"nodes": self.nodes}

    async def heal(self, world: World) -> dict[str, Any]:
        for node in self.nodes:
            world.cluster.procs[node].resume()
        return {}


class Restart(Nemesis):
    def __init__(self, target: str = "one", graceful: bool = False, site: str | None = None) -> None:
        super().__init__()
        self.target = target
        self.graceful = graceful
        self.site = site
        self.kind = f"restart-{target}" + ("-graceful" if graceful else "")

    def describe(self) -> str:
        how = "SIGTERM (leave)" if self.graceful else "SIGKILL"
        return f"{how} {self.target} and start it again at once"

    async def apply(self, world: World) -> dict[str, Any]:
        nodes = await _target(world, self.rng, self.target, self.site)
        for node in nodes:
            proc = world.cluster.procs[node]
            await asyncio.to_thread(proc.terminate if self.graceful else proc.kill)
            proc.start()
        return {"nodes": nodes}


class ClockSkew(Nemesis):
    kind = "clock-skew"

    def __init__(self, offset_s: float = 90.0) -> None:
        super().__init__()
        self.offset_s = offset_s
        self.node: str | None = None

    def describe(self) -> str:
        return (
            f"restart one node with its clock {self.offset_s:+g}s off (libfaketime); "
            "heal restarts it on true time"
        )

    async def _restart_with(self, world: World, offset: str) -> None:
        proc = world.cluster.procs[self.node]
        world.cluster.clock_file(self.node).write_text(offset + "\n")
        await asyncio.to_thread(proc.kill)
        proc.start()

    async def apply(self, world: World) -> dict[str, Any]:
        candidates = sorted(world.cluster.plan.faketime_nodes)
        if not candidates:
            raise NemesisError(
                "clock faults need a node started under libfaketime (ClusterPlan.faketime_nodes)"
            )
        self.node = self.rng.choice(candidates)
        await self._restart_with(world, f"{self.offset_s:+g}s")
        return {"node": self.node, "offset_s": self.offset_s}

    async def heal(self, world: World) -> dict[str, Any]:
        if self.node:
            await self._restart_with(world, "+0")
        return {}


class ClockJump(ClockSkew):
    kind = "clock-jump"

    def describe(self) -> str:
        return (
            f"jump one running node's clocks by {self.offset_s:+g}s (libfaketime; monotonic too), "
            "back on heal"
        )

    async def apply(self, world: World) -> dict[str, Any]:
        candidates = sorted(world.cluster.plan.faketime_nodes)
        if not candidates:
            raise NemesisError(
                "clock faults need a node started under libfaketime (ClusterPlan.faketime_nodes)"
            )
        self.node = self.rng.choice(candidates)
        world.cluster.clock_file(self.node).write_text(f"{self.offset_s:+g}s\n")
        return {"node": self.node, "offset_s": self.offset_s}

    async def heal(self, world: World) -> dict[str, Any]:
        if self.node:
            world.cluster.clock_file(self.node).write_text("+0\n")
        return {}


FILLER = ".chaos-filler"


class DiskFull(Nemesis):
    kind = "disk-full"

    def __init__(self) -> None:
        super().__init__()
        self.node: str | None = None

    def describe(self) -> str:
        return "fill one node's (tmpfs) data directory to the last byte; heal deletes the filler"

    async def apply(self, world: World) -> dict[str, Any]:
        candidates = sorted(world.cluster.plan.tmpfs_mb)
        if not candidates:
            raise NemesisError("disk-full needs a node with a tmpfs data dir (ClusterPlan.tmpfs_mb)")
        self.node = self.rng.choice(candidates)
        filled = await asyncio.to_thread(_fill, world.cluster.data_dir(self.node) / FILLER)
        return {"node": self.node, "filled_bytes": filled}

    async def heal(self, world: World) -> dict[str, Any]:
        if self.node:
            (world.cluster.data_dir(self.node) / FILLER).unlink(missing_ok=True)
        return {}


def _fill(path: Path) -> int:
    """Write zeros to `path` until the file system refuses even one more byte; returns bytes written."""
    written = 0
    block = 1 << 20
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while block >= 1:
            try:
                written += os.write(fd, b"\0" * block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                block //= 2  # the last few KiB too, so nothing at all is left
    finally:
        os.close(fd)
    return written


class Corrupt(Nemesis):
    def __init__(self, what: str = "chunk", how: str = "bitflip") -> None:
        super().__init__()
        if what not in ("chunk", "audit") or how not in ("bitflip", "truncate"):
            raise NemesisError("corrupt: what is chunk|audit, how is bitflip|truncate")
        self.what = what
        self.how = how
        self.kind = f"corrupt-{what}-{how}"

    def describe(self) -> str:
        thing = "a stored model file" if self.what == "chunk" else "the audit log"
        return f"{self.how} {thing} of one random node, on disk"

    async def apply(self, world: World) -> dict[str, Any]:
        nodes = list(world.cluster.plan.ids)
        self.rng.shuffle(nodes)
        for node in nodes:
            files = _candidates(world.cluster.data_dir(node), self.what)
            if files:
                target = self.rng.choice(files)
                detail = await asyncio.to_thread(_damage, target, self.how, self.rng)
                if self.what == "audit":
                    world.mark_tampered(node)
                return {"node": node, "file": str(target.relative_to(world.cluster.data_dir(node))), **detail}
        raise NemesisError(f"no {self.what} file on any node to corrupt")


def _candidates(data_dir: Path, what: str) -> list[Path]:
    if what == "audit":
        path = data_dir / "raft" / "audit.log"
        return [path] if path.exists() and path.stat().st_size > 0 else []
    root = data_dir / "artifacts"
    found = sorted(root.glob("models/*/*.tflite")) + sorted(root.glob("chunks/*/*"))
    return [p for p in found if p.is_file() and p.stat().st_size > 0 and not p.name.startswith(".")]


def _damage(path: Path, how: str, rng: random.Random) -> dict[str, Any]:
    size = path.stat().st_size
    if how == "bitflip":
        offset = rng.randrange(size)
        bit = rng.randrange(8)
        with path.open("r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ (1 << bit)]))
        return {"offset": offset, "bit": bit, "size_bytes": size}
    # Truncate inside the last record/chunk, never at its boundary: a cut exactly between two
    # records of an audit log would look like a log that simply ended there.
    keep = max(1, size - 2 - rng.randrange(max(1, min(size - 2, 64))))
    with path.open("r+b") as f:
        f.truncate(keep)
    return {"kept_bytes": keep, "size_bytes": size}
