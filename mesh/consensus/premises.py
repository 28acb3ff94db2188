"""Decisions whose premise is gone, and the streams a node gets back when it returns. Pure.

Rules of this module (every judgement a site's leader makes about decisions already taken lives here):

- A reassignment's premise is that its node is dead. A held ``reassign_streams`` of a node
  that membership sees ALIVE again is withdrawn (`stale_holds`); so is a held
  ``return_streams`` to a node that is DEAD, LEFT or unknown again. Membership is the
  caller's: this module takes its answer as sets of node ids.
- Streams that a reassignment took from a node that was only cut off go back to it once it
  has stayed ALIVE for a settle period (`ReturnSchedule`), by a ``return_streams`` decision
  (`plan_return`) that the guard judges like any other. Only streams still where the
  reassignment put them move (the ledger's displacements); a stream moved since, on purpose,
  stays. A node that flaps (suspected or dead again within the settle period) starts the
  period over.
- No clock and no randomness of its own: `now` and an injected `random.Random` come in,
  deadlines go out (`ReturnSchedule.due`), so the shell knows when to wake.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from mesh.consensus.ledger import Displacement, HeldDecision
from mesh.consensus.planning import new_nonce
from mesh.guard.core import MAX_MOVES, Decision, DecisionKind, StreamMove


@dataclass(frozen=True)
class Withdrawal:
    """Held decision `decision_id` is to be withdrawn because of `reason` (its premise is gone)."""

    decision_id: str
    reason: str


def stale_holds(
    pending: Iterable[HeldDecision], *, alive: Collection[str], gone: Collection[str]
) -> list[Withdrawal]:
    """Held decisions whose premise membership no longer supports: a reassignment of a node in
    `alive`, a return to a node in `gone` (dead, left, or unknown to membership)."""
    out = []
    for held in pending:
        decision = held.decision
        if decision.kind is DecisionKind.REASSIGN_STREAMS:
            node = decision.moves[0].from_node
            if node in alive:
                out.append(Withdrawal(held.decision_id, f"{node} is alive again; its streams stay with it"))
        elif decision.kind is DecisionKind.RETURN_STREAMS:
            node = decision.moves[0].to_node
            if node in gone:
                out.append(Withdrawal(
                    held.decision_id, f"{node} is down again; its streams stay where they are"))
    return out


def returnable(routes: Mapping[str, str], displaced: Mapping[str, Displacement], home: str) -> list[str]:
    """Streams a reassignment took from `home` that are still where it put them, sorted."""
    return sorted(s for s, taken in displaced.items() if taken.home == home and routes.get(s) == taken.holder)


def plan_return(
    routes: Mapping[str, str],
    displaced: Mapping[str, Displacement],
    home: str,
    *,
    group: str,
    proposer: str,
    alive_for_s: float,
    now: float,
    rng: random.Random,
) -> Decision | None:
    """The decision that gives `home` back the streams a reassignment took from it (those still
    where it put them), proposed by `proposer` at `now`; None if there are none."""
    streams = returnable(routes, displaced, home)[:MAX_MOVES]
    if not streams:
        return None
    return Decision(
        kind=DecisionKind.RETURN_STREAMS,
        group=group,
        proposer=proposer,
        reason=f"{home} is back (alive for {alive_for_s:.0f}s); returning the streams reassigned from it "
               "while it was marked dead",
        proposed_at=float(now),
        nonce=new_nonce(rng),
        moves=tuple(StreamMove(s, displaced[s].holder, home) for s in streams),
    )


class ReturnSchedule:
    """How long each member has been ALIVE without a break, and whose streams are due back.

    Fed membership transitions (`up`, `down`) and, every round, the set of members ALIVE now
    (`observe`: fills in members whose transition was missed). `settle_s` is how long a node
    must stay ALIVE before the streams a reassignment took from it are proposed back.
    """

    def __init__(self, settle_s: float) -> None:
        if not settle_s >= 0:
            raise ValueError(f"settle period must be >= 0 s, got {settle_s!r}")
        self.settle_s = settle_s
        self._since: dict[str, float] = {}

    def up(self, node: str, now: float, *, restart: bool = False) -> None:
        """`node` is ALIVE; `restart`: it was suspect or dead until now, so its period starts over."""
        if restart:
            self._since[node] = now
        else:
            self._since.setdefault(node, now)

    def down(self, node: str) -> None:
        """`node` is suspect, dead or gone: no period runs for it."""
        self._since.pop(node, None)

    def observe(self, alive: Collection[str], now: float) -> None:
        for node in list(self._since):
            if node not in alive:
                del self._since[node]
        for node in alive:
            self._since.setdefault(node, now)

    def alive_for_s(self, node: str, now: float) -> float | None:
        since = self._since.get(node)
        return None if since is None else max(0.0, now - since)

    def due(
        self, routes: Mapping[str, str], displaced: Mapping[str, Displacement], now: float
    ) -> tuple[list[str], float | None]:
        """Nodes ALIVE for the settle period that have streams to get back, and the earliest time
        another node will be (None: nobody is waiting)."""
        homes = {taken.home for s, taken in displaced.items() if routes.get(s) == taken.holder}
        due, next_at = [], None
        for home in sorted(homes):
            since = self._since.get(home)
            if since is None:
                continue
            at = since + self.settle_s
            if now >= at:
                due.append(home)
            else:
                next_at = at if next_at is None else min(next_at, at)
        return due, next_at
