"""What one replica of a site group did, counted for its metrics.

`GroupCounts` is fed by the group: each proposal this member made with its outcome
(`proposed`), and each entry this replica applied for the first time (`applied`: journal
replays after a restart are not counted again). Counts only grow; `snapshot()` copies them
for a scrape, which may run on another thread than the ones counting.

What an applied entry counts, read from its `ApplyResult`:

- a guard verdict per decision judged: `allow` when it was applied within the autonomous
  scope, `hold` when it waits for an operator (its `proposed` audit event names the kind);
- an approval outcome per operator answer checked: `approved`, `denied`, or the reason the
  approval was refused (`forged`, `expired`, `replayed`, `not_pending`, ...).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field

from mesh.consensus.ledger import ApplyResult, Outcome
from mesh.consensus.raft import NoLeaderError, NotLeaderError, ProposalTimeout
from mesh.guard.core import DecisionKind

#: Proposal kinds: the decision kinds, and the initial assignment of streams.
PROPOSAL_KINDS = (*(kind.value for kind in DecisionKind), "set_routes")
PROPOSAL_OUTCOMES = ("committed", "held", "refused", "not_leader", "timeout", "failed")
VERDICTS = ("allow", "hold")
#: Approval outcomes shown from the start; refusal reasons beyond these appear when they happen.
APPROVAL_OUTCOMES = ("approved", "denied", "malformed", "wrong_decision", "unknown_key", "not_operator_key",
                     "forged", "expired", "replayed")

_OUTCOME_OF_RESULT = {Outcome.APPLIED: "committed", Outcome.NOOP: "committed", Outcome.HELD: "held",
                      Outcome.DENIED: "committed", Outcome.EXPIRED: "committed", Outcome.REFUSED: "refused"}


@dataclass(frozen=True)
class CountsSnapshot:
    proposals: dict[tuple[str, str], int]  # (kind, outcome) -> count
    verdicts: dict[tuple[str, str], int]  # (kind, verdict) -> count
    approvals: dict[str, int]  # outcome -> count
    audit_failures: int


@dataclass
class GroupCounts:
    """Counters of one replica; safe to feed from the loop and the Raft tick thread at once."""

    _proposals: Counter = field(default_factory=Counter)
    _verdicts: Counter = field(default_factory=Counter)
    _approvals: Counter = field(default_factory=Counter)
    _audit_failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def proposed(self, kind: str, outcome: str) -> None:
        """One proposal by this member and how it ended (one of PROPOSAL_OUTCOMES)."""
        with self._lock:
            self._proposals[(kind, outcome)] += 1

    def proposal_result(self, kind: str, result: ApplyResult) -> None:
        self.proposed(kind, _OUTCOME_OF_RESULT.get(result.outcome, "failed"))

    def applied(self, result: ApplyResult) -> None:
        """An entry this replica applied for the first time."""
        kinds = [event.kind for event in result.audit]
        with self._lock:
            if "proposed" in kinds and result.outcome in (Outcome.APPLIED, Outcome.HELD):
                kind = str(result.audit[kinds.index("proposed")].payload.get("kind", ""))
                self._verdicts[(kind, "allow" if result.outcome is Outcome.APPLIED else "hold")] += 1
            if "approved" in kinds or "denied" in kinds:
                self._approvals["approved" if "approved" in kinds else "denied"] += 1
            elif "refused" in kinds:
                refused = result.audit[kinds.index("refused")].payload
                if "key_id" in refused:  # only an operator's answer carries a key id
                    self._approvals[str(refused.get("reason", "refused"))] += 1

    def audit_failed(self) -> None:
        with self._lock:
            self._audit_failures += 1

    def snapshot(self) -> CountsSnapshot:
        with self._lock:
            return CountsSnapshot(dict(self._proposals), dict(self._verdicts), dict(self._approvals),
                                  self._audit_failures)


async def count_proposal(counts: GroupCounts, kind: str, proposal: Awaitable[ApplyResult]) -> ApplyResult:
    """Await `proposal` (a SiteGroup write) and count how it ended under `kind`; errors propagate."""
    try:
        result = await proposal
    except (NoLeaderError, NotLeaderError):
        counts.proposed(kind, "not_leader")
        raise
    except ProposalTimeout:
        counts.proposed(kind, "timeout")
        raise
    except Exception:
        counts.proposed(kind, "failed")
        raise
    counts.proposal_result(kind, result)
    return result
