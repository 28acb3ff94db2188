"""The rollout documents a node holds, verified, to hand on: publisher-signed plans and operator-signed
commands. Pure.

A node learns documents from an operator (`mesh rollout start`, `mesh rollout approve`...) or from a
peer that announces them (anti-entropy), and keeps a document only once it has checked the signature
itself: a plan by a trusted publisher key, a command by a trusted operator key about exactly that plan.
What it holds is what it announces (`note_digests`) and serves to peers, so a document nobody can
verify never spreads. A document that failed verification is remembered by digest (`refused`) and
never fetched again from anyone; one that passed is never checked twice.

Documents are forgotten when their plan has been expired for `RETAIN_AFTER_EXPIRY_S` (as the site
ledgers forget them); a rollout keeps at most `MAX_COMMANDS_PER_ROLLOUT` commands, dropping expired
ones first.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mesh.identity.signing import TrustedKeys
from mesh.rollout.announce import PLAN_DIGEST_HEX, digest_commands
from mesh.rollout.plan import (
    CommandAction,
    CommandRefused,
    PlanExpiredError,
    PlanSignatureError,
    RolloutCommand,
    RolloutError,
    RolloutPlan,
    SignedPlan,
    verify_command,
    verify_plan,
)
from mesh.rollout.state import RETAIN_AFTER_EXPIRY_S

MAX_ROLLOUT_DOCS = 64
MAX_COMMANDS_PER_ROLLOUT = 64
MAX_REFUSED = 1024


class DocumentRefused(RolloutError):
    """A document did not verify; `.reason` is the stable code (as the ledgers audit it)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def command_digest(command: RolloutCommand) -> str:
    """sha256 hex of a command's JSON: how documents name one command."""
    return hashlib.sha256(command.to_json()).hexdigest()


@dataclass
class _Rollout:
    signed: SignedPlan
    commands: dict[str, RolloutCommand]


class RolloutDocs:
    """Verified plans and commands by rollout id (one replica-independent store per node)."""

    def __init__(self, trusted: TrustedKeys) -> None:
        self.trusted = trusted
        self._rollouts: dict[str, _Rollout] = {}
        self._refused: dict[str, str] = {}  # document digest -> reason

    # --- views ---

    def plans(self) -> list[RolloutPlan]:
        """Every plan held, oldest first."""
        return sorted(
            (r.signed.plan for r in self._rollouts.values()), key=lambda p: (p.created_at, p.rollout_id)
        )

    def plan(self, rollout_id: str) -> RolloutPlan | None:
        held = self._rollouts.get(rollout_id)
        return None if held is None else held.signed.plan

    def signed_plan(self, rollout_id: str) -> SignedPlan | None:
        held = self._rollouts.get(rollout_id)
        return None if held is None else held.signed

    def commands(self, rollout_id: str) -> list[RolloutCommand]:
        """The commands held for a rollout, oldest issued first."""
        held = self._rollouts.get(rollout_id)
        if held is None:
            return []
        return sorted(held.commands.values(), key=lambda c: (c.issued_at, c.nonce))

    def note_digests(self, rollout_id: str) -> tuple[int, str]:
        """(how many commands, their digest) as a note announces them."""
        held = self._rollouts.get(rollout_id)
        names = held.commands if held is not None else {}
        return len(names), digest_commands(names)

    def refused(self, digest: str) -> str | None:
        """Why the document with this digest (or plan digest prefix) was refused, if it was."""
        if digest in self._refused:
            return self._refused[digest]
        if len(digest) == PLAN_DIGEST_HEX:
            return next((why for d, why in self._refused.items() if d.startswith(digest)), None)
        return None

    def abort_of(self, rollout_id: str) -> RolloutCommand | None:
        """A verified operator abort of this rollout, if one is held."""
        return next((c for c in self.commands(rollout_id) if c.action is CommandAction.ABORT), None)

    # --- adding ---

    def add_plan(self, signed: SignedPlan, *, now: float) -> RolloutPlan:
        """Verify and hold `signed`; raise DocumentRefused (remembered) if it does not verify or its id
        already names another plan. Holding it again is a no-op."""
        plan = signed.plan
        held = self._rollouts.get(plan.rollout_id)
        if held is not None:
            if held.signed.digest == signed.digest:
                return plan
            raise DocumentRefused(
                f"rollout id {plan.rollout_id} already names plan {held.signed.digest[:16]}", "id_collision"
            )
        why = self._refused.get(signed.digest)
        if why is not None:
            raise DocumentRefused(f"{plan.label} was refused here before ({why})", why)
        try:
            verify_plan(signed, self.trusted, now=now)
        except PlanSignatureError as exc:
            self._refuse(signed.digest, exc.reason)
            raise DocumentRefused(str(exc), exc.reason) from None
        except PlanExpiredError as exc:
            raise DocumentRefused(str(exc), "expired") from None
        if len(self._rollouts) >= MAX_ROLLOUT_DOCS:
            self.forget_expired(now)
            if len(self._rollouts) >= MAX_ROLLOUT_DOCS:
                raise DocumentRefused(f"this node already holds {MAX_ROLLOUT_DOCS} rollouts", "too_many")
        self._rollouts[plan.rollout_id] = _Rollout(signed, {})
        return plan

    def add_command(self, command: RolloutCommand, *, now: float) -> bool:
        """Verify and hold `command` (about a plan held here); True if it is new. Raises DocumentRefused
        (remembered when the signature is bad) if it does not verify."""
        held = self._rollouts.get(command.rollout_id)
        if held is None:
            raise DocumentRefused(f"no plan for rollout {command.rollout_id} is held here", "unknown_rollout")
        digest = command_digest(command)
        if digest in held.commands:
            return False
        why = self._refused.get(digest)
        if why is not None:
            raise DocumentRefused(f"{command.label} was refused here before ({why})", why)
        try:
            verify_command(command, held.signed.plan, self.trusted, now=now, used_nonces=())
        except CommandRefused as exc:
            if exc.reason != "expired":  # an expired command was genuine: nothing to remember
                self._refuse(digest, exc.reason)
            raise DocumentRefused(str(exc), exc.reason) from None
        held.commands[digest] = command
        if len(held.commands) > MAX_COMMANDS_PER_ROLLOUT:
            oldest = min(held.commands.items(), key=lambda kv: (kv[1].expires_at > now, kv[1].issued_at))
            del held.commands[oldest[0]]
        return True

    def drop_plan(self, rollout_id: str) -> None:
        self._rollouts.pop(rollout_id, None)

    def forget_expired(self, now: float) -> None:
        """Forget rollouts whose plan expired more than RETAIN_AFTER_EXPIRY_S ago."""
        for rollout_id, held in list(self._rollouts.items()):
            if now >= held.signed.plan.expires_at + RETAIN_AFTER_EXPIRY_S:
                del self._rollouts[rollout_id]

    def _refuse(self, digest: str, reason: str) -> None:
        if len(self._refused) >= MAX_REFUSED:
            self._refused.pop(next(iter(self._refused)))
        self._refused[digest] = reason
