"""What a site's members propose on their own: where a dead node's streams go, which streams an
overloaded node hands off, and when a node counts as overloaded. Pure.

Rules of this module (every choice behind a node's own proposal lives here):

- No clock, no randomness of its own, no I/O. A planner takes the routing table it plans
  from, the live members of the site (the caller asks membership), `now` (the decision's
  ``proposed_at``) and an injected `random.Random` (the decision's nonce), and returns the
  `Decision` to propose, or None when there is nothing to do. The same inputs and the same
  seed give the same decision, digest included.
- Planning is not deciding: the decision goes through the guard inside every replica's
  apply (`mesh.consensus.ledger`), which applies it at once, holds it for an operator, or
  refuses it if the routes changed meanwhile.
- Least loaded first: each stream goes to the live node serving the fewest streams at that
  point of the plan (ties broken by node id), counting what the plan has already given, so
  a plan never leaves a node it fed more than one stream above the least-loaded live node.
- One decision carries at most `MAX_MOVES` moves (more would be refused as malformed by
  every replica); streams beyond that are left for the next plan.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from mesh.guard.core import MAX_MOVES, Decision, DecisionKind, StreamMove

#: Share of an overloaded node's streams it offers to hand off in one decision.
OFFLOAD_FRACTION = 0.5


def new_nonce(rng: random.Random) -> str:
    """A decision nonce (16 hex characters) drawn from `rng`: it keeps two identical proposals distinct."""
    return f"{rng.getrandbits(64):016x}"


def least_loaded_moves(
    routes: Mapping[str, str], streams: Sequence[str], from_node: str, targets: Iterable[str]
) -> tuple[StreamMove, ...]:
    """Moves of `streams` (in that order) off `from_node`, each to the target serving the fewest
    streams in `routes` plus what this plan already gave it; ties go to the smallest node id."""
    candidates = sorted(set(targets) - {from_node})
    if not candidates:
        return ()
    load = Counter(owner for owner in routes.values() if owner in candidates)
    moves = []
    for stream in streams:
        target = min(candidates, key=lambda n: (load[n], n))
        load[target] += 1
        moves.append(StreamMove(stream, from_node, target))
    return tuple(moves)


def plan_reassignment(
    routes: Mapping[str, str],
    dead: str,
    live: Iterable[str],
    *,
    group: str,
    proposer: str,
    now: float,
    rng: random.Random,
) -> Decision | None:
    """The decision that moves every stream `dead` serves to the live nodes of its site serving the
    fewest, proposed by `proposer` at `now`; None if `dead` serves no stream or no live node is left."""
    streams = sorted(s for s, owner in routes.items() if owner == dead)[:MAX_MOVES]
    moves = least_loaded_moves(routes, streams, dead, live)
    if not moves:
        return None
    return Decision(
        kind=DecisionKind.REASSIGN_STREAMS,
        group=group,
        proposer=proposer,
        reason=f"{dead} was marked dead by membership",
        proposed_at=float(now),
        nonce=new_nonce(rng),
        moves=moves,
    )


def plan_offload(
    routes: Mapping[str, str],
    overloaded: str,
    live: Iterable[str],
    *,
    group: str,
    reason: str,
    now: float,
    rng: random.Random,
    fraction: float = OFFLOAD_FRACTION,
) -> Decision | None:
    """The decision, proposed by `overloaded` itself, that hands `fraction` (at least one) of its
    streams to the live nodes serving the fewest; None when it serves fewer than two streams (moving
    its only stream just moves the overload) or no other live node is left."""
    mine = sorted(s for s, owner in routes.items() if owner == overloaded)
    if len(mine) < 2:
        return None
    count = min(max(1, int(len(mine) * fraction)), MAX_MOVES)
    moves = least_loaded_moves(routes, mine[:count], overloaded, live)
    if not moves:
        return None
    return Decision(
        kind=DecisionKind.MOVE_STREAMS,
        group=group,
        proposer=overloaded,
        reason=reason,
        proposed_at=float(now),
        nonce=new_nonce(rng),
        moves=moves,
    )


class OverloadWatch:
    """Decides from samples of the inference queue whether this node is overloaded: the queue
    held at least `queue_per_worker` requests per worker for `sustained` samples in a row.
    After it fires it stays quiet for `cooldown` samples, so one episode gives one proposal.
    The node feeds it samples on a timer."""

    def __init__(
        self, *, workers: int, queue_per_worker: float = 2.0, sustained: int = 3, cooldown: int = 12
    ) -> None:
        self.threshold = workers * queue_per_worker
        self.sustained = sustained
        self.cooldown = cooldown
        self._streak = 0
        self._quiet = 0

    def sample(self, pending: int) -> bool:
        """Feed one queue-length sample; True when a move off this node should be proposed."""
        if self._quiet:
            self._quiet -= 1
            return False
        self._streak = self._streak + 1 if pending >= self.threshold else 0
        if self._streak >= self.sustained:
            self._streak, self._quiet = 0, self.cooldown
            return True
        return False

    def reason(self, node_id: str, interval_s: float) -> str:
        """Why `node_id` offloads, for the decision (samples taken every `interval_s`)."""
        return (
            f"{node_id} is overloaded (inference queue >= {self.threshold:.0f} for "
            f"{self.sustained * interval_s:.0f}s)"
        )
