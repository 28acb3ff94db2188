"""Network fault plans, without I/O: who stops hearing whom, and the nft ruleset that says so.

A partition is a set of directed *grudges* (as Jepsen calls them): the pair
(src, dst) means packets from src to dst are dropped on the bridge, so dst no
longer hears src. A symmetric cut lists both directions; an asymmetric one only
one. Loss is a percentage per directed pair. Every function here takes node ids
and an injected `random.Random`, so a seed reproduces the same cut.

`render_ruleset` turns the union of every active fault into one nft script for
the bridge namespace; applying it is atomic (one `nft -f` transaction), so
faults that overlap (a flapping cut beside a lossy link) compose without
ever leaving a half-written ruleset.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence

Grudges = frozenset[tuple[str, str]]

BRIDGE_TABLE = "fmc"


class FaultPlanError(ValueError):
    """A fault cannot be planned on these nodes (too few nodes, unknown node)."""


def cut(side_a: Iterable[str], side_b: Iterable[str]) -> Grudges:
    """Both directions between every node of `side_a` and every node of `side_b`."""
    a, b = list(side_a), list(side_b)
    return frozenset({(x, y) for x in a for y in b} | {(y, x) for x in a for y in b})


def components(groups: Sequence[Iterable[str]]) -> Grudges:
    """Nodes hear only the members of their own group."""
    sets = [list(g) for g in groups]
    out: set[tuple[str, str]] = set()
    for i, group in enumerate(sets):
        for other in sets[i + 1 :]:
            out |= cut(group, other)
    return frozenset(out)


def isolate(node: str, nodes: Iterable[str]) -> Grudges:
    """`node` hears nobody and nobody hears it."""
    return cut([node], [n for n in nodes if n != node])


def halves(nodes: Sequence[str], rng: random.Random) -> tuple[Grudges, list[list[str]]]:
    """A random split into a smaller and a larger half (Jepsen's random halves)."""
    if len(nodes) < 2:
        raise FaultPlanError(f"halves needs at least 2 nodes, got {len(nodes)}")
    shuffled = list(nodes)
    rng.shuffle(shuffled)
    small = sorted(shuffled[: len(shuffled) // 2])
    large = sorted(shuffled[len(shuffled) // 2 :])
    return cut(small, large), [small, large]


def minority_with(
    nodes: Sequence[str], keep: str, minority_size: int, rng: random.Random
) -> tuple[Grudges, list[list[str]]]:
    """Split so that `keep` is on a side of `minority_size` nodes (e.g. the leader on the 2 side of 2|3)."""
    if keep not in nodes:
        raise FaultPlanError(f"{keep} is not among {list(nodes)}")
    if not 1 <= minority_size < len(nodes):
        raise FaultPlanError(f"a side of {minority_size} of {len(nodes)} nodes is not a split")
    others = sorted(n for n in nodes if n != keep)
    rng.shuffle(others)
    minority = sorted([keep, *others[: minority_size - 1]])
    majority = sorted(n for n in nodes if n not in minority)
    return cut(minority, majority), [minority, majority]


def majorities_ring(nodes: Sequence[str], rng: random.Random) -> Grudges:
    """Every node hears a majority, but no two nodes hear the same majority (Jepsen's
    majorities-ring): nodes on a shuffled ring each hear their nearest neighbours only."""
    n = len(nodes)
    if n < 4:
        raise FaultPlanError(f"majorities-ring needs at least 4 nodes, got {n}")
    ring = list(nodes)
    rng.shuffle(ring)
    majority = n // 2 + 1
    reach = majority // 2  # ring distance heard on each side: 2 * reach + 1 >= majority, and < n
    out = set()
    for i, dst in enumerate(ring):
        for j, src in enumerate(ring):
            distance = min((i - j) % n, (j - i) % n)
            if distance > reach:
                out.add((src, dst))  # ring distance is symmetric, so the cut is too
    return frozenset(out)


def bridge(nodes: Sequence[str], rng: random.Random) -> tuple[Grudges, dict[str, object]]:
    """Two halves that hear one bridge node in the middle, but not each other (Jepsen's bridge)."""
    if len(nodes) < 3:
        raise FaultPlanError(f"bridge needs at least 3 nodes, got {len(nodes)}")
    shuffled = list(nodes)
    rng.shuffle(shuffled)
    middle = shuffled[0]
    rest = shuffled[1:]
    left, right = sorted(rest[: len(rest) // 2]), sorted(rest[len(rest) // 2 :])
    return cut(left, right), {"left": left, "bridge": middle, "right": right}


def one_way(deaf: Iterable[str], speakers: Iterable[str]) -> Grudges:
    """`deaf` nodes stop hearing `speakers`; the speakers still hear them (asymmetric)."""
    return frozenset((s, d) for d in deaf for s in speakers if s != d)


def render_ruleset(
    addresses: Mapping[str, str], drops: Iterable[tuple[str, str]], losses: Mapping[tuple[str, str], int]
) -> str:
    """The nft script (for the bridge namespace) that drops `drops` and randomly drops
    `losses[pair]` percent of the packets of each lossy pair. Pairs are node ids,
    mapped to IPv4 addresses with `addresses`. The table is flushed and rebuilt in
    the same transaction."""
    lines = [
        f"add table bridge {BRIDGE_TABLE}",
        f"flush table bridge {BRIDGE_TABLE}",
        f"table bridge {BRIDGE_TABLE} {{",
        "  chain forward {",
        "    type filter hook forward priority 0; policy accept;",
    ]
    dropped = sorted(set(drops))
    for src, dst in dropped:
        lines.append(f"    ip saddr {_ip(addresses, src)} ip daddr {_ip(addresses, dst)} drop")
    for (src, dst), percent in sorted(losses.items()):
        if (src, dst) in dropped or percent <= 0:
            continue
        if percent > 100:
            raise FaultPlanError(f"loss of {percent}% between {src} and {dst} is above 100%")
        lines.append(
            f"    ip saddr {_ip(addresses, src)} ip daddr {_ip(addresses, dst)} "
            f"numgen random mod 100 < {int(percent)} drop"
        )
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _ip(addresses: Mapping[str, str], node: str) -> str:
    try:
        return addresses[node]
    except KeyError:
        raise FaultPlanError(f"no address for {node!r}; known: {', '.join(sorted(addresses))}") from None


def hears(grudges: Iterable[tuple[str, str]], nodes: Iterable[str]) -> dict[str, set[str]]:
    """dst -> the set of other nodes it still hears under `grudges` (for reports and tests)."""
    blocked = set(grudges)
    all_nodes = list(nodes)
    return {dst: {src for src in all_nodes if src != dst and (src, dst) not in blocked} for dst in all_nodes}
