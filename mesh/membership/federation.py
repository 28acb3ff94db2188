"""Who represents a site in the federation pool (pure).

Each site (label `site`) gossips in its own pool; a few of its members, its
representatives, also join the federation pool, which carries per-site
summaries between sites, as Consul's servers join the WAN pool. Every member
of the site computes the same choice from its own view, so the site agrees on
its representatives without a vote once its views agree; while views differ
(a death not yet known everywhere) two members may briefly disagree, which
costs an extra federation member for a few gossip rounds, nothing more.

The choice is sticky: a live representative stays one. Re-choosing from
scratch (say, the k lowest ids) would move the role whenever a member with a
lower id joins, and each move costs a federation join, a leave and a refill
of that node's federation table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from typing import Protocol

from mesh.membership.messages import Labels, State

__all__ = ["DEFAULT_REPRESENTATIVES", "SITE_LABEL", "choose_representatives", "fetcher", "site_of"]

SITE_LABEL = "site"
DEFAULT_REPRESENTATIVES = 3

_LIVE = (State.ALIVE, State.SUSPECT)


class _Member(Protocol):
    @property
    def node_id(self) -> str: ...
    @property
    def labels(self) -> Labels: ...
    @property
    def state(self) -> State: ...


def site_of(labels: Labels) -> str | None:
    """The value of the `site` label, if any."""
    for key, value in labels:
        if key == SITE_LABEL:
            return value
    return None


def choose_representatives(members: Iterable[_Member], site: str, current: Iterable[str] = (),
                           k: int = DEFAULT_REPRESENTATIVES,
                           tenure: Mapping[str, int] | None = None,
                           preferred: Collection[str] = ()) -> tuple[str, ...]:
    """The node ids (sorted) that represent `site` in the federation pool.

    Candidates are the members of the site that are live (ALIVE, or SUSPECT:
    not yet declared dead, so a representative is not replaced on a mere
    suspicion). `preferred` candidates (those that can do all a representative
    does, e.g. run the site's rollouts) come first: a preferred current
    representative keeps the role; free places go to preferred candidates,
    then to other current representatives, then to other candidates. Within
    each group, current representatives keep the role the longest serving
    first (by `tenure`, when the role began, then the lowest id), newcomers
    ALIVE before SUSPECT, lowest id first. Without `preferred` that is: current
    representatives that are still candidates keep the role (at most k), the
    free places go to the other candidates. So a preferred representative is
    never displaced by another, and one that is not preferred only by a
    preferred candidate. Exactly min(k, candidates) are chosen, and the result
    depends only on the view, `current` and `preferred`, not on their order.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, not {k}")
    candidates = {m.node_id: m for m in members if m.state in _LIVE and site_of(m.labels) == site}
    since = tenure or {}
    liked = set(preferred)
    serving = sorted((node_id for node_id in set(current) if node_id in candidates),
                     key=lambda node_id: (since.get(node_id, 0), node_id))
    newcomers = sorted((m for node_id, m in candidates.items() if node_id not in set(serving)),
                       key=lambda m: (m.state is not State.ALIVE, m.node_id))
    fresh = [m.node_id for m in newcomers]
    chosen: list[str] = []
    for group in ([n for n in serving if n in liked], [n for n in fresh if n in liked],
                  [n for n in serving if n not in liked], [n for n in fresh if n not in liked]):
        chosen += group[:k - len(chosen)]
    return tuple(sorted(chosen))


def fetcher(representatives: Iterable[str], name: str, version: str) -> str | None:
    """The representative that fetches `name` `version` across the site boundary: the highest
    rendezvous hash of (version, node id). Every member of the site that agrees on the
    representatives agrees on it, a version's bytes cross into the site about once, and
    different versions spread over the representatives. None when there are none."""
    def score(node_id: str) -> tuple[bytes, str]:
        return hashlib.blake2b(f"{name}\0{version}\0{node_id}".encode(), digest_size=8).digest(), node_id
    return max(representatives, key=score, default=None)
