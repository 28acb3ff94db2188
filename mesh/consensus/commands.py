"""The commands of a site's decision ledger and their wire form: canonical JSON, parsed strictly. Pure.

Rules of this module (everything about the bytes a Raft entry carries lives here):

- A command is canonical JSON with `"format": 1`, a `"cmd"` name (propose,
  approve, deny, expire, withdraw, set_routes, remove_member), a `"now"` stamped by whoever
  submitted it, and exactly the fields of that command; anything else is a
  `CommandError` naming the field.
- Encoding is canonical (`canonical_json`): the same command has the same bytes
  on every node, so every replica applies the same log.
- Parsing is strict: UTF-8 only, no NaN or Infinity, no duplicate keys, at most
  `MAX_COMMAND_BYTES`. `strict_json` is shared with the ledger's snapshots.
- The command dataclasses are the decoded form the ledger applies
  (`mesh.consensus.ledger.DecisionLedger.apply`); the `*_command` functions
  build the bytes a node proposes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh.guard.approval import Approval, MalformedApproval
from mesh.guard.core import (
    DECISION_ID_HEX_CHARS,
    MAX_REASON_CHARS,
    MAX_SLOTS,
    NODE_ID_RE,
    STREAM_ID_RE,
    Decision,
    DecisionError,
    as_seconds,
    is_text,
)
from mesh.identity.revocation import Revocation, RevocationError, parse_revocation
from mesh.identity.signing import canonical_json

COMMAND_FORMAT = 1
# A command carries one decision (bounded by MAX_MOVES) or one approval; 1 MiB is far above either.
MAX_COMMAND_BYTES = 1024 * 1024
MAX_ROUTES_PER_COMMAND = 4096


class LedgerError(Exception):
    """Root of errors raised by the decision ledger and its command codec."""


class CommandError(LedgerError):
    """A command's bytes are not a valid command (names the field; the command is refused, not applied)."""



@dataclass(frozen=True)
class ProposeCommand:
    now: float
    decision: Decision


@dataclass(frozen=True)
class ApproveCommand:
    now: float
    approval: Approval


@dataclass(frozen=True)
class DenyCommand:
    now: float
    approval: Approval


@dataclass(frozen=True)
class ExpireCommand:
    now: float


@dataclass(frozen=True)
class WithdrawCommand:
    """Finish held decision `decision_id` unapplied because its premise is gone (`reason` says which)."""

    now: float
    decision_id: str
    reason: str


@dataclass(frozen=True)
class SetRoutesCommand:
    """Initial assignment: routes for streams that have none, allocations for nodes that have none."""

    now: float
    routes: Mapping[str, str]
    allocations: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RemoveMemberCommand:
    """Take `revocation.node_id` out of the site's Raft group: an operator revoked it. The ledger
    applies it only when the revocation verifies against the operator keys; the Raft membership
    change follows it (see `mesh.consensus.group.SiteGroup.remove_revoked`)."""

    now: float
    revocation: Revocation


Command = (ProposeCommand | ApproveCommand | DenyCommand | ExpireCommand | WithdrawCommand | SetRoutesCommand
           | RemoveMemberCommand)

_COMMAND_FIELDS = {
    "propose": frozenset({"format", "cmd", "now", "decision"}),
    "approve": frozenset({"format", "cmd", "now", "approval"}),
    "deny": frozenset({"format", "cmd", "now", "approval"}),
    "expire": frozenset({"format", "cmd", "now"}),
    "withdraw": frozenset({"format", "cmd", "now", "decision_id", "reason"}),
    "set_routes": frozenset({"format", "cmd", "now", "routes", "allocations"}),
    "remove_member": frozenset({"format", "cmd", "now", "revocation"}),
}


def _command(cmd: str, now: float, **fields: Any) -> bytes:
    check_now(now, CommandError)
    return canonical_json({"format": COMMAND_FORMAT, "cmd": cmd, "now": float(now), **fields})


def propose_command(decision: Decision, *, now: float | None = None) -> bytes:
    """Propose `decision`; `now` defaults to the decision's `proposed_at`."""
    return _command("propose", decision.proposed_at if now is None else now, decision=decision.to_dict())


def approve_command(approval: Approval, *, now: float) -> bytes:
    if not approval.approve:
        raise CommandError("this approval says deny (approve=false); submit it with deny_command")
    return _command("approve", now, approval=approval.to_dict())


def deny_command(approval: Approval, *, now: float) -> bytes:
    if approval.approve:
        raise CommandError("this approval says approve (approve=true); submit it with approve_command")
    return _command("deny", now, approval=approval.to_dict())


def expire_command(now: float) -> bytes:
    return _command("expire", now)


def withdraw_command(decision_id: str, *, reason: str, now: float) -> bytes:
    """Withdraw held decision `decision_id`: its premise is gone (`reason` says which, for the audit log)."""
    validate_withdraw(WithdrawCommand(now, decision_id, reason))
    return _command("withdraw", now, decision_id=decision_id, reason=reason)


def set_routes_command(
    routes: Mapping[str, str], *, allocations: Mapping[str, int] | None = None, now: float
) -> bytes:
    cmd = SetRoutesCommand(now, dict(routes), dict(allocations or {}))
    validate_set_routes(cmd)
    return _command("set_routes", now, routes=dict(cmd.routes), allocations=dict(cmd.allocations))


def remove_member_command(revocation: Revocation, *, now: float) -> bytes:
    """Remove the node `revocation` names from the group (the ledger verifies the operator's signature)."""
    return _command("remove_member", now, revocation=revocation.to_dict())


def encode_command(command: Command) -> bytes:
    if isinstance(command, ProposeCommand):
        return propose_command(command.decision, now=command.now)
    if isinstance(command, ApproveCommand):
        return approve_command(command.approval, now=command.now)
    if isinstance(command, DenyCommand):
        return deny_command(command.approval, now=command.now)
    if isinstance(command, ExpireCommand):
        return expire_command(command.now)
    if isinstance(command, WithdrawCommand):
        return withdraw_command(command.decision_id, reason=command.reason, now=command.now)
    if isinstance(command, SetRoutesCommand):
        return set_routes_command(command.routes, allocations=command.allocations, now=command.now)
    if isinstance(command, RemoveMemberCommand):
        return remove_member_command(command.revocation, now=command.now)
    raise CommandError(f"not a ledger command: {type(command).__name__}")


def strict_json(data: bytes, what: str, error: type[Exception], limit: int) -> Any:
    """Parse `data` (at most `limit` bytes of UTF-8 JSON) refusing NaN, Infinity and duplicate keys;
    raise `error` naming `what` and the problem (commands and ledger snapshots both come from the network)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise error(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > limit:
        raise error(f"{what}: {len(data)} bytes, at most {limit} allowed")
    try:
        return json.loads(
            bytes(data).decode("utf-8"),
            parse_constant=_refuse_constant,
            object_pairs_hook=_no_duplicate_keys,
        )
    except UnicodeDecodeError:
        raise error(f"{what}: not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise error(f"{what}: not valid JSON ({exc})") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def check_now(now: object, error: type[Exception], where: str = "now") -> float:
    """`now` as seconds since the epoch (a finite number >= 0), or `error` naming `where`."""
    seconds = as_seconds(now)
    if seconds is None:
        raise error(f"{where}: expected seconds since the epoch >= 0, got {now!r}")
    return seconds


def decode_command(data: bytes) -> Command:
    """Parse command bytes strictly; raise CommandError saying what is wrong."""
    doc = strict_json(data, "command", CommandError, MAX_COMMAND_BYTES)
    if not isinstance(doc, dict):
        raise CommandError(f"command: expected a JSON object, got {type(doc).__name__}")
    fmt = doc.get("format")
    if type(fmt) is not int or fmt != COMMAND_FORMAT:
        raise CommandError(
            f"command.format: unsupported format {fmt!r}; this node applies format {COMMAND_FORMAT}"
        )
    cmd = doc.get("cmd")
    if not isinstance(cmd, str) or cmd not in _COMMAND_FIELDS:
        raise CommandError(
            f"command.cmd: unknown command {cmd!r}; expected one of {', '.join(sorted(_COMMAND_FIELDS))}"
        )
    expected = _COMMAND_FIELDS[cmd]
    if doc.keys() != expected:
        missing = sorted(expected - doc.keys())
        unknown = sorted(doc.keys() - expected)
        raise CommandError(
            f"command {cmd}: missing field(s) {missing or 'none'}, unknown field(s) {unknown or 'none'}"
        )
    now = check_now(doc["now"], CommandError, "command.now")
    try:
        if cmd == "propose":
            return ProposeCommand(now, Decision.from_dict(doc["decision"]))
        if cmd in ("approve", "deny"):
            approval = Approval.from_dict(doc["approval"])
            if approval.approve != (cmd == "approve"):
                raise CommandError(
                    f"command {cmd}: the signed approval says approve={str(approval.approve).lower()}"
                )
            return (ApproveCommand if cmd == "approve" else DenyCommand)(now, approval)
    except (DecisionError, MalformedApproval) as exc:
        raise CommandError(f"command {cmd}: {exc}") from None
    if cmd == "expire":
        return ExpireCommand(now)
    if cmd == "withdraw":
        withdraw = WithdrawCommand(now, doc["decision_id"], doc["reason"])
        validate_withdraw(withdraw)
        return withdraw
    if cmd == "remove_member":
        if not isinstance(doc["revocation"], dict):
            raise CommandError("command remove_member: revocation must be an object")
        try:  # its fields only here; the signature is the ledger's to check (it holds the operator keys)
            return RemoveMemberCommand(now, parse_revocation(canonical_json(doc["revocation"])))
        except RevocationError as exc:
            raise CommandError(f"command remove_member: {exc}") from None
    routes, allocations = doc["routes"], doc["allocations"]
    if not isinstance(routes, dict) or not isinstance(allocations, dict):
        raise CommandError("command set_routes: routes and allocations must be objects")
    command = SetRoutesCommand(now, routes, allocations)
    validate_set_routes(command)
    return command


def validate_withdraw(cmd: WithdrawCommand) -> None:
    """Raise CommandError unless `cmd` names a decision id and gives a reason."""
    decision_id = cmd.decision_id
    if not isinstance(decision_id, str) or len(decision_id) != DECISION_ID_HEX_CHARS \
            or any(c not in "0123456789abcdef" for c in decision_id):
        raise CommandError(f"command withdraw: decision_id {decision_id!r} is not {DECISION_ID_HEX_CHARS} "
                           "lowercase hex characters")
    if not is_text(cmd.reason, MAX_REASON_CHARS) or not cmd.reason.strip():
        raise CommandError(f"command withdraw: reason must be text of 1 to {MAX_REASON_CHARS} characters "
                           "saying which premise is gone")


def validate_set_routes(cmd: SetRoutesCommand) -> None:
    """Raise CommandError unless every stream id, node id and allocation of `cmd` is valid and in bounds."""
    if len(cmd.routes) > MAX_ROUTES_PER_COMMAND or len(cmd.allocations) > MAX_ROUTES_PER_COMMAND:
        raise CommandError(f"command set_routes: at most {MAX_ROUTES_PER_COMMAND} routes and allocations")
    for stream, node in cmd.routes.items():
        if not isinstance(stream, str) or not STREAM_ID_RE.fullmatch(stream):
            raise CommandError(f"command set_routes: {stream!r} is not a valid stream id")
        if not isinstance(node, str) or not NODE_ID_RE.fullmatch(node):
            raise CommandError(f"command set_routes: route of {stream} names {node!r}, not a valid node id")
    for node, slots in cmd.allocations.items():
        if not isinstance(node, str) or not NODE_ID_RE.fullmatch(node):
            raise CommandError(f"command set_routes: {node!r} is not a valid node id")
        if type(slots) is not int or not 0 <= slots <= MAX_SLOTS:
            raise CommandError(f"command set_routes: allocation of {node} must be an integer 0..{MAX_SLOTS}")
