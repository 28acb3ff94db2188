"""Whom a downloader asks which chunks they hold, and when (pure; issue 10: chunk progress between
transfer peers, as BitTorrent's HAVE messages, not in gossip).

Gossip carries a holding's progress in steps (eighths, `mesh.transfer.holdings`) with a snapshot of its
bitfield from when the step last changed. A downloader wants exact chunk lists only from the peers it may
fetch from, and only from those whose gossip is not exact already:

- complete holders, the origin and holdings from older nodes (their bitfield is live) are never asked;
- of the other holders of the same manifest with something to give (step >= 1), at most `k` are in the
  exchange at a time: those already in it stay while they hold the version; free places go to same-site
  holders first, then by a seeded draw (so downloaders do not all pick the same ones);
- a member is asked when it joins, when its gossiped step moves, every `stale_s` (+-50%), and in a round
  where the download is starving (it issued no request), never more often than `min_interval_s`;
- an answer replaces what was known of it; a failed ask is retried after `min_interval_s` doubling up to
  `stale_s`;
- an answer far below the step its gossip announces (fewer chunks than one step less, under any rounding
  of steps) leaves the exchange, and the holder is not taken in again while it announces that step: a
  peer announcing a high step and giving nothing would otherwise keep one of the `k` places for good;
- so does a holder whose asks failed `MAX_FAILED_ASKS` times in a row (no answer, an error, a chunk list
  of another length, "not held"), with the same way back (its step moves, or `SHUN_S` passes), but only
  while another holder waits for a place (otherwise it keeps its place and is asked at `stale_s`), and
  its last chunk list is still believed meanwhile (failures do not make it wrong). A refusal for the
  asker's own ask budget (`failed(..., counts=False)`) weighs half a failure.

No clock, socket or global randomness: the caller passes the time and the generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mesh.artifacts.bitfield import Bitfield
from mesh.transfer.holdings import STEPS

__all__ = ["HaveExchange", "Holder", "believed"]

SHUN_S = 60.0  # a shunned holder is taken in again after this long even at the same step (a wiped store)
MAX_FAILED_ASKS = 5  # failed asks in a row (about 12 s of back-offs) that take a holder out of the exchange


def believed(snapshot: Bitfield, told: Bitfield | None) -> Bitfield:
    """The chunks a downloader counts a peer as holding: its gossiped bitfield (a snapshot from its last
    step change, or an older node's live bitfield) and what its last chunk list said (`told`, from
    `HaveExchange.known`), unless that list is of another chunk count (not this manifest's: ignored)."""
    if told is None or len(told) != len(snapshot):
        return snapshot.copy()
    return snapshot | told


@dataclass(frozen=True)
class Holder:
    """A peer announcing the version being downloaded, as its gossip says."""

    peer_id: str
    site: str
    step: int | None  # announced progress in eighths; None: an older node's live bitfield
    complete: bool
    origin: bool = False


@dataclass
class _Member:
    step: int | None
    asked_at: float = float("-inf")
    answered_at: float = float("-inf")
    due_after_s: float = 0.0  # from asked_at: the stale interval drawn, or the back-off after a failure
    backoff_s: float = 0.0
    have: Bitfield | None = None
    in_flight: bool = False
    asked_step: int | None = None  # its gossiped step when the ask in flight went out
    failures: float = 0.0  # failed asks since its last answer (a refusal for our ask budget weighs half)


@dataclass
class HaveExchange:
    self_site: str
    rng: random.Random
    k: int = 8
    min_interval_s: float = 1.0
    stale_s: float = 5.0
    _members: dict[str, _Member] = field(default_factory=dict)
    _last_asked: dict[str, float] = field(default_factory=dict)  # kept while it leaves and comes back
    # peer -> (the step its answer belied, until when): a new step, or time, gives a new chance
    _shunned: dict[str, tuple[int | None, float]] = field(default_factory=dict)
    # peer -> (its step, its last chunk list) for holders shunned after failed asks: still believed
    _kept: dict[str, tuple[int | None, Bitfield]] = field(default_factory=dict)
    _waiting: int = 0  # askable holders outside the exchange at the last `to_ask`

    def __post_init__(self) -> None:
        if self.k < 1 or not 0 < self.min_interval_s <= self.stale_s:
            raise ValueError(f"k must be >= 1 and 0 < min_interval_s <= stale_s, got k={self.k}, "
                             f"min_interval_s={self.min_interval_s}, stale_s={self.stale_s}")

    @staticmethod
    def askable(holder: Holder) -> bool:
        return not (holder.complete or holder.origin or holder.step is None) and holder.step >= 1

    def next_due(self, now: float) -> float:
        """When the next ask falls due without any new gossip (inf: none): the caller wakes then."""
        due = [max(m.asked_at + m.due_after_s, self._last_asked.get(p, float("-inf")) + self.min_interval_s)
               for p, m in self._members.items() if not m.in_flight]
        return max(now, min(due)) if due else float("inf")  # never nan: due_after_s is finite

    def members(self) -> list[str]:
        return sorted(self._members)

    def shunned(self) -> list[str]:
        """Holders whose answer belied the step they still announce: not asked until it changes."""
        return sorted(self._shunned)

    def known(self, peer_id: str, step: int | None = None) -> Bitfield | None:
        """The last chunk list `peer_id` gave (None: not in the exchange nor shunned after failed asks,
        never answered, or its gossiped `step` is now below the one it had when it answered: it lost
        chunks since)."""
        member = self._members.get(peer_id)
        if member is not None:
            had_step, have = member.step, member.have
        elif peer_id in self._kept:
            had_step, have = self._kept[peer_id]
        else:
            return None
        if have is None or (step is not None and had_step is not None and step < had_step):
            return None
        return have.copy()

    def to_ask(self, holders: list[Holder], now: float, *, starving: bool = False) -> list[str]:
        """Refresh the members from `holders` (this round's gossip) and say whom to ask now; each is
        counted as asked (in flight) until `answered` or `failed`."""
        askable = {h.peer_id: h for h in holders if self.askable(h)}
        for peer_id in [p for p in self._members if p not in askable]:
            del self._members[peer_id]  # completed, left, or no longer announces it: gossip says enough
        self._shunned = {p: (step, until) for p, (step, until) in self._shunned.items()
                         if p in askable and askable[p].step == step and now < until}
        self._kept = {p: (step, have) for p, (step, have) in self._kept.items()
                      if p in askable and not (step is not None and (askable[p].step or 0) < step)}
        self._last_asked = {p: t for p, t in self._last_asked.items() if now - t < self.min_interval_s}
        for peer_id, member in self._members.items():
            step = askable[peer_id].step
            if step != member.step:
                if step is not None and member.step is not None and step < member.step:
                    member.have = None  # it lost chunks (a wiped store, a new download): its answer is old
                member.step = step
                member.due_after_s = 0.0  # its progress moved: ask again (still at most min_interval_s)
        free = self.k - len(self._members)
        if free > 0:
            outsiders = [h for p, h in askable.items() if p not in self._members and p not in self._shunned]
            # Same site first, then a seeded draw: downloaders do not all pick the same holders.
            draws = {h.peer_id: self.rng.random() for h in sorted(outsiders, key=lambda h: h.peer_id)}
            outsiders.sort(key=lambda h: (h.site != self.self_site, draws[h.peer_id]))
            for holder in outsiders[:free]:
                _, kept = self._kept.pop(holder.peer_id, (None, None))
                self._members[holder.peer_id] = _Member(step=holder.step, have=kept)
        self._waiting = sum(1 for p in askable if p not in self._members and p not in self._shunned)
        due = []
        for peer_id, member in sorted(self._members.items()):
            if member.in_flight:
                continue
            # The same sums as next_due's, so that at next_due the ask it promised is made.
            if now < self._last_asked.get(peer_id, float("-inf")) + self.min_interval_s:
                continue
            if now >= member.asked_at + member.due_after_s or starving:
                due.append(peer_id)
        for peer_id in due:
            member = self._members[peer_id]
            member.in_flight, member.asked_at, member.asked_step = True, now, member.step
            self._last_asked[peer_id] = now
        return due

    def answered(self, peer_id: str, have: Bitfield, now: float) -> None:
        member = self._members.get(peer_id)
        if member is None or not member.in_flight:  # an ask from before it left the exchange and came back
            return
        # Against the step it announced when asked (its gossip may have moved on while the ask was out).
        steps = [s for s in (member.step, member.asked_step) if s is not None]
        if steps and have.count() < (min(steps) - 1) * len(have) // STEPS:
            del self._members[peer_id]  # it gave far less than it announces: its place goes to another
            self._shunned[peer_id] = (member.step, now + SHUN_S)
            return
        member.in_flight, member.have, member.answered_at, member.backoff_s = False, have.copy(), now, 0.0
        member.failures = 0
        member.due_after_s = self.stale_s * self.rng.uniform(0.5, 1.5)

    def failed(self, peer_id: str, now: float, *, counts: bool = True) -> None:
        """The ask got no chunk list; `counts=False`: refused for our own ask budget, likely not the
        holder's doing (it weighs half a failure)."""
        member = self._members.get(peer_id)
        if member is None or not member.in_flight:  # an ask from before it left the exchange and came back
            return
        member.in_flight = False
        # Half: a holder could otherwise keep its place by refusing every ask as over our budget.
        member.failures += 1.0 if counts else 0.5
        if member.failures >= MAX_FAILED_ASKS and self._waiting > 0:
            del self._members[peer_id]  # a place it does not use: it goes to a holder waiting for one
            self._shunned[peer_id] = (member.step, now + SHUN_S)
            if member.have is not None:
                self._kept[peer_id] = (member.step, member.have)
            return
        member.backoff_s = min(self.stale_s, max(self.min_interval_s, 2 * member.backoff_s))
        member.due_after_s = max(0.0, now - member.asked_at) + member.backoff_s  # from now

    def forget(self, peer_id: str, now: float) -> None:
        """It does not hold the version (it said so): what it said is dropped, and it is asked again
        only after a back-off (gossip may still list it for a while)."""
        member = self._members.get(peer_id)
        if member is not None and member.in_flight:
            member.have = None
            self.failed(peer_id, now)
