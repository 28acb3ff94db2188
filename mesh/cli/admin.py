"""`mesh admin`: an operator's commands against a running node: the fleet as it sees it, and its
site group's decisions (pending, history, approve, deny, move, routes, audit) and Raft state (group).

Approvals are signed here, with the operator key on the operator's machine; the node only
ever sees the signed approval.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mesh.cli.common import (
    CONTEXT,
    EXIT_FAILED,
    EXIT_USAGE,
    admin_creds_default,
    admin_options,
    call_or_exit,
    console,
    emit_json,
    err_console,
    fail,
    operator_client,
)

if TYPE_CHECKING:
    from mesh._proto import decisions_pb2 as pb
    from mesh.admin.client import DecisionsClient
    from mesh.guard.approval import Approval
    from mesh.guard.core import Decision

DEFAULT_APPROVAL_TTL_S = 600.0


@click.group(context_settings=CONTEXT)
def admin() -> None:
    """Operator commands against a running node (need an operator certificate)."""


@admin.command("status", epilog="Examples:\n\n  mesh admin status --node 127.0.0.1:7000\n\n"
                                "  mesh admin status --node 127.0.0.1:7000 --json | jq '.members[].state'")
@admin_options
def admin_status(address: str, creds_dir: Path, as_json: bool) -> None:
    """Show NODE's view of the fleet: id, address, site, state, incarnation, last heard."""
    from mesh.admin.format import status_dict, status_table

    resp = call_or_exit(address, creds_dir, lambda client: client.status())
    group = _group_status_or_none(address, creds_dir)
    audit = resp.audit
    if as_json:
        from mesh.admin.format import group_view_dict

        doc = status_dict(resp)
        doc["audit"] = {"checked": audit.checked, "ok": audit.ok, "records": audit.records,
                        "first_bad_seq": audit.first_bad_seq or None, "reason": audit.reason,
                        "path": audit.path} if audit.checked else None
        doc["raft"] = group_view_dict(group.group) if group is not None else None
        emit_json(doc)
        return
    console.print(status_table(resp))
    from mesh.admin.format import federation_line

    pools = federation_line(resp)
    if pools is not None:
        console.print(pools, highlight=False)
    if group is not None:
        from mesh.admin.format import raft_line

        console.print(f"raft group {group.group.group}: {raft_line(group.group)}", highlight=False)
    if audit.checked and audit.ok:
        console.print(f"audit log: {audit.reason} (checked at start)", highlight=False)
    elif audit.checked:
        console.print(f"[red]warning:[/] audit log {audit.path} on {resp.node_id} does not verify "
                      f"(checked at start): {audit.reason}. Run `mesh admin audit --verify --node {address}` "
                      "and keep the file as evidence", highlight=False)


def _group_status_or_none(address: str, creds_dir: Path) -> Any:
    """The node's Raft group status, or None when it has no [raft] section (or cannot say)."""
    from mesh.admin.client import AdminError, DecisionsClient

    with operator_client(address, creds_dir, DecisionsClient) as client:
        try:
            return client.group_status()
        except AdminError:
            return None


# --- decisions of NODE's site group -----------------------------------------------------------


def _decisions_client(address: str, creds_dir: Path) -> DecisionsClient:
    from mesh.admin.client import DecisionsClient

    return operator_client(address, creds_dir, DecisionsClient)


def _decisions_call(address: str, creds_dir: Path, call: Any) -> Any:
    from mesh.admin.client import DecisionsClient

    return call_or_exit(address, creds_dir, call, DecisionsClient)


def _print_stale_note(view: pb.GroupView) -> None:
    from mesh.admin.format import stale_note

    note = stale_note(view)
    if note is not None:
        console.print(f"[yellow]warning:[/] {note}", highlight=False)


def operator_key_path(creds_dir: Path) -> Path:
    """Where the operator signing key is, for the commands a held decision prints: the fleet folder
    holding the certificate folder (FLEET/operators/NAME -> FLEET/operator.key), else the fleet
    folder `mesh fleet enroll` defaults to ($MESH_FLEET or ./fleet)."""
    creds_dir = Path(creds_dir)
    if creds_dir.parent.name == "operators":
        beside = creds_dir.parent.parent / "operator.key"
        if beside.exists():
            return beside
    return Path(os.environ.get("MESH_FLEET", "fleet")) / "operator.key"


def unblock_commands(decision_id: str, address: str, creds_dir: Path) -> tuple[str, str]:
    """The approve and deny commands that unblock a held decision, as they can be pasted."""
    key = shlex.quote(str(operator_key_path(creds_dir)))
    target = f"--node {address}" + (f" --creds {shlex.quote(str(creds_dir))}"
                                    if str(creds_dir) != admin_creds_default() else "")
    return (f"mesh admin approve {decision_id} --key {key} {target}",
            f"mesh admin deny {decision_id} --key {key} --reason '...' {target}")


def client_name(creds_dir: Path) -> str:
    """The operator's name from its certificate (the proposer of an operator decision)."""
    from mesh.identity.ca import load_credentials

    return load_credentials(creds_dir).name


def _result_exit(result: pb.DecisionResult, as_json: bool) -> None:
    from mesh.admin.format import result_dict

    if as_json:
        emit_json(result_dict(result))
    elif result.outcome == "refused":
        err_console.print(f"[red]refused:[/] {result.message} (reason: {result.refusal_reason}); the refusal "
                          "is in every replica's audit log", highlight=False)
    else:
        style = {"applied": "green", "denied": "yellow", "held": "yellow"}.get(result.outcome, "bold")
        console.print(f"[{style}]{result.message}[/] (group {result.group.group}, "
                      f"asked {result.group.node_id})", highlight=False)
    if result.outcome == "refused":
        sys.exit(EXIT_FAILED)


def _find_held(client: DecisionsClient, decision_id: str) -> pb.HeldDecisionInfo:
    """The held decision named by `decision_id` (or a unique prefix of at least 6 characters)."""
    resp = client.pending()
    matches = [h for h in resp.held if h.decision_id == decision_id]
    if not matches and len(decision_id) >= 6:
        matches = [h for h in resp.held if h.decision_id.startswith(decision_id)]
    if len(matches) > 1:
        fail(f"{decision_id} matches {len(matches)} held decisions; give more characters of the id")
    if not matches:
        finished = [e for e in resp.recent if e.decision_id and e.decision_id.startswith(decision_id)
                    and e.outcome != "refused"]
        if finished:
            e = finished[-1]
            fail(f"decision {e.decision_id} is no longer held: it was {e.outcome} ({e.detail})")
        held = ", ".join(h.decision_id for h in resp.held) or "none"
        fail(f"decision {decision_id} is not held in group {resp.group.group} on {client.address} "
             f"(held: {held}); see `mesh admin pending --node {client.address}`")
    return matches[0]


def _sign(held: pb.HeldDecisionInfo, key_path: Path, *, approve: bool, ttl_s: float,
          reason: str) -> tuple[Decision, Approval]:
    from mesh.guard.approval import sign_approval
    from mesh.guard.core import Decision, DecisionError
    from mesh.identity.signing import IdentityError, KeyRole, load_signing_key

    try:
        decision = Decision.from_dict(json.loads(held.decision_json))
    except (ValueError, DecisionError) as exc:
        fail(f"the node sent a decision that does not parse ({exc}); not signing it")
    if decision.decision_id != held.decision_id:
        fail(f"the node sent decision {decision.decision_id} for id {held.decision_id}; not signing it")
    try:
        key = load_signing_key(key_path, KeyRole.OPERATOR)
    except IdentityError as exc:
        fail(str(exc))
    return decision, sign_approval(key, decision, now=time.time(), ttl_s=ttl_s,
                                   nonce=secrets.token_urlsafe(18), approve=approve, reason=reason)


def _answer(decision_id: str, key_path: Path, ttl_s: float, reason: str, address: str, creds_dir: Path,
            as_json: bool, *, approve: bool) -> None:
    from mesh.admin.client import AdminError

    with _decisions_client(address, creds_dir) as client:
        try:
            held = _find_held(client, decision_id)
            _, approval = _sign(held, key_path, approve=approve, ttl_s=ttl_s, reason=reason)
            send = client.approve if approve else client.deny
            result = send(approval.to_dict())
        except AdminError as exc:
            fail(str(exc))
    _result_exit(result, as_json)


@admin.command("pending", context_settings=CONTEXT, epilog=(
    "Examples:\n\n  mesh admin pending --node 127.0.0.1:7000\n\n"
    "  mesh admin pending --node 127.0.0.1:7000 --json | jq '.held[].decision_id'\n\n"
    "The header names the answering member's Raft state (leader, term, commit/applied index, reachable "
    "members, how long since it heard from a leader); `mesh admin group` shows it in full."))
@admin_options
def pending(address: str, creds_dir: Path, as_json: bool) -> None:
    """Decisions of NODE's site group held for an operator (id, kind, scope vs limit, proposer, age), its
    rollouts waiting for one (a wave held above the autonomous scope, an inconclusive pause), each with the
    exact command that unblocks it, then the latest outcomes (applied, denied, expired, refused,
    withdrawn)."""
    from mesh.admin.format import held_table, pending_dict, recent_table

    resp = _decisions_call(address, creds_dir, lambda client: client.pending())
    now = time.time()
    rollouts = _waiting_rollouts(address, creds_dir)
    if as_json:
        emit_json({**pending_dict(resp, now), "rollouts": rollouts})
        return
    _print_stale_note(resp.group)
    console.print(held_table(resp, now))
    for h in resp.held:
        approve_cmd, deny_cmd = unblock_commands(h.decision_id, address, creds_dir)
        console.print(f"[yellow]{h.decision_id}[/] {h.describe}\n  waits for an operator: "
                      f"{'; '.join(h.exceeded)}\n  approve: {approve_cmd}\n  deny:    {deny_cmd}",
                      highlight=False)
    for r in rollouts:
        what = (f"wave {r['wave']} is held above the autonomous scope" if r["state"] == "waiting_approval"
                else f"paused at wave {r['wave']}: {r['reason']}")
        lines = "\n".join(f"  {verb + ':':8} {command}" for verb, command in r["commands"].items())
        # soft_wrap: a command is printed on one line, so it can be pasted as it is.
        console.print(f"[yellow]rollout {r['rollout_id']}[/] ({r['change']}) in site {r['site']}: "
                      f"{what}\n{lines}", highlight=False, soft_wrap=True)
    recent = recent_table(resp)
    if recent is not None:
        console.print(recent)


def _waiting_rollouts(address: str, creds_dir: Path) -> list[dict[str, Any]]:
    """NODE's site's rollouts that wait for an operator (a held wave, a pause), with the exact commands that
    unblock them; empty when the node cannot tell (no [raft] section)."""
    from mesh.admin.client import AdminError
    from mesh.admin.rollout_client import RolloutClient

    with operator_client(address, creds_dir, RolloutClient) as client:
        try:
            rows = client.list()
        except AdminError:
            return []
    key = shlex.quote(str(operator_key_path(creds_dir)))
    target = f"--node {address}" + (f" --creds {shlex.quote(str(creds_dir))}"
                                    if str(creds_dir) != admin_creds_default() else "")
    out = []
    for r in rows:
        own = r.get("own_site")
        if not own or own["state"] not in ("waiting_approval", "paused"):
            continue
        rid, held = r["rollout_id"], own["state"] == "waiting_approval"
        wave = own["wave"] + 1 if held else own["wave"]
        commands = ({"approve": f"mesh rollout approve {rid} --wave {wave} --key {key} {target}"} if held
                    else {"resume": f"mesh rollout resume {rid} --key {key} {target}"})
        commands["abort"] = f"mesh rollout abort {rid} --reason '...' --key {key} {target}"
        change = f"{r['model']} {r['baseline_version']} -> {r['target_version']}"
        out.append({"rollout_id": rid, "change": change, "site": own["site"], "state": own["state"],
                    "wave": wave, "reason": own["reason"], "commands": commands})
    return out


@admin.command("history", context_settings=CONTEXT, epilog=(
    "Examples:\n\n  mesh admin history --node 127.0.0.1:7000\n\n"
    "  mesh admin history --node 127.0.0.1:7000 --json | jq '.[] | select(.outcome == \"withdrawn\")'"))
@admin_options
def history(address: str, creds_dir: Path, as_json: bool) -> None:
    """The latest outcomes of NODE's site group's decisions, oldest first: applied, denied, expired,
    refused, and withdrawn (held decisions whose premise was gone, e.g. a dead node that came back)."""
    from mesh.admin.format import pending_dict, recent_table

    resp = _decisions_call(address, creds_dir, lambda client: client.pending())
    if as_json:
        emit_json(pending_dict(resp, time.time())["recent"])
        return
    _print_stale_note(resp.group)
    recent = recent_table(resp)
    if recent is None:
        console.print(f"no decision of group {resp.group.group} has finished yet")
    else:
        console.print(recent)


@admin.command("group", context_settings=CONTEXT, epilog=(
    "Examples:\n\n  mesh admin group --node 127.0.0.1:7000\n\n"
    "  mesh admin group --node 127.0.0.1:7000 --json | jq '.group.leader_contact_s'\n\n"
    "Answers at once, even from a member cut off from its group (no read barrier); exits 1 when that "
    "member is cut off (no leader heard from for two election timeouts)."))
@admin_options
def group(address: str, creds_dir: Path, as_json: bool) -> None:
    """NODE's view of its site's Raft group: leader, term, commit and applied index, which members
    it reaches, and how long since it last heard from a leader."""
    from mesh.admin.format import group_status_dict, group_status_table

    resp = _decisions_call(address, creds_dir, lambda client: client.group_status())
    if as_json:
        emit_json(group_status_dict(resp))
    else:
        console.print(group_status_table(resp))
        if resp.audit_error:
            err_console.print(f"[red]audit log:[/] {resp.audit_error}", highlight=False)
    if resp.group.cut_off:
        sys.exit(EXIT_FAILED)


@admin.command("approve", context_settings=CONTEXT, epilog=(
    "Example:\n\n  mesh admin approve 3f9a0c1d2e4b5a69 --key fleet/operator.key --node 127.0.0.1:7000\n\n"
    "The approval is signed here with the operator key; the node never sees the key. Every replica "
    "of the group checks the signature before it applies the decision."))
@click.argument("decision_id")
@click.option("--key", "key_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The operator signing key (operator.key from `mesh fleet init`).")
@click.option("--ttl-s", type=click.FloatRange(1.0, 7 * 24 * 3600.0), default=DEFAULT_APPROVAL_TTL_S,
              show_default=True, help="How long the signed approval stays valid.")
@click.option("--reason", default="", help="Why (goes to the audit log).")
@admin_options
def approve(decision_id: str, key_path: Path, ttl_s: float, reason: str, address: str, creds_dir: Path,
            as_json: bool) -> None:
    """Sign an approval of held decision DECISION_ID with the operator key and send it."""
    _answer(decision_id, key_path, ttl_s, reason, address, creds_dir, as_json, approve=True)


@admin.command("deny", context_settings=CONTEXT, epilog=(
    "Example:\n\n  mesh admin deny 3f9a0c1d2e4b5a69 --key fleet/operator.key --reason 'cam-7 is in "
    "maintenance' --node 127.0.0.1:7000"))
@click.argument("decision_id")
@click.option("--key", "key_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The operator signing key (operator.key from `mesh fleet init`).")
@click.option("--reason", required=True, help="Why it is denied (goes to the audit log).")
@click.option("--ttl-s", type=click.FloatRange(1.0, 7 * 24 * 3600.0), default=DEFAULT_APPROVAL_TTL_S,
              show_default=True, help="How long the signed denial stays valid.")
@admin_options
def deny(decision_id: str, key_path: Path, reason: str, ttl_s: float, address: str, creds_dir: Path,
         as_json: bool) -> None:
    """Sign a denial of held decision DECISION_ID: it is finished on every replica, never applied."""
    _answer(decision_id, key_path, ttl_s, reason, address, creds_dir, as_json, approve=False)


@admin.command("move", context_settings=CONTEXT, epilog=(
    "Examples:\n\n  mesh admin move cam-17a --to cam-gw-02 --node 127.0.0.1:7000 --reason 'rebalance'\n\n"
    "  mesh admin move cam-17a cam-17b --to cam-gw-02 --node 127.0.0.1:7000\n\n"
    "The move is a decision like any other: the guard applies it if its scope is within the "
    "policy, else it is held and `mesh admin approve` unblocks it."))
@click.argument("streams", nargs=-1, required=True)
@click.option("--to", "to_node", required=True, help="Node id that is to serve the streams.")
@click.option("--reason", default="operator request", show_default=True, help="Why (goes to the audit log).")
@admin_options
def move(streams: tuple[str, ...], to_node: str, reason: str, address: str, creds_dir: Path,
         as_json: bool) -> None:
    """Propose moving STREAMS to another node of NODE's site group (an operator decision)."""
    from mesh.admin.client import AdminError
    from mesh.guard.core import Decision, DecisionError, DecisionKind, StreamMove

    with _decisions_client(address, creds_dir) as client:
        try:
            current = client.routes()
            unknown = [s for s in streams if s not in current.routes]
            if unknown:
                fail(f"no route for {', '.join(unknown)} in group {current.group.group}; "
                     "`mesh admin routes` lists the streams", EXIT_USAGE)
            moves = tuple(StreamMove(s, current.routes[s], to_node) for s in streams
                          if current.routes[s] != to_node)
            if not moves:
                fail(f"{', '.join(streams)} already served by {to_node}", EXIT_USAGE)
            try:
                decision = Decision(kind=DecisionKind.MOVE_STREAMS, group=current.group.group,
                                    proposer=client_name(creds_dir), reason=reason, proposed_at=time.time(),
                                    nonce=secrets.token_hex(8), moves=moves)
            except DecisionError as exc:
                fail(str(exc), EXIT_USAGE)
            result = client.propose(decision.to_dict())
        except AdminError as exc:
            fail(str(exc))
    _result_exit(result, as_json)


@admin.command("routes", context_settings=CONTEXT, epilog=(
    "Examples:\n\n  mesh admin routes --node 127.0.0.1:7000\n\n"
    "  mesh admin routes --node 127.0.0.1:7000 --json | jq '.routes'"))
@admin_options
def routes(address: str, creds_dir: Path, as_json: bool) -> None:
    """The routing table of NODE's site group (stream -> serving node) and per-node allocations."""
    from mesh.admin.format import routes_dict, routes_table, unrouted_note

    resp = _decisions_call(address, creds_dir, lambda client: client.routes())
    if as_json:
        emit_json(routes_dict(resp))
        return
    _print_stale_note(resp.group)
    console.print(routes_table(resp))
    note = unrouted_note(resp)
    if note is not None:
        console.print(note, highlight=False)


@admin.command("audit", context_settings=CONTEXT, epilog=(
    "Examples:\n\n  mesh admin audit --node 127.0.0.1:7000 --limit 20\n\n"
    "  mesh admin audit --node 127.0.0.1:7000 --verify   # exit 1 and the first bad record if broken"))
@click.option("--verify", is_flag=True, help="Check the hash chain; exit 1 naming the first bad record.")
@click.option("--limit", type=click.IntRange(0, 1_000_000), default=50, show_default=True,
              help="Show the last N records (0: all).")
@admin_options
def audit(verify: bool, limit: int, address: str, creds_dir: Path, as_json: bool) -> None:
    """NODE's audit log of its group's decisions: proposals, holds, approvals, denials, refusals, applies."""
    from mesh.admin.format import audit_dict, audit_table

    resp = _decisions_call(address, creds_dir, lambda client: client.audit(verify=verify, limit=limit))
    v = resp.verdict
    if as_json:
        emit_json(audit_dict(resp))
    else:
        console.print(audit_table(resp))
        if v.checked and v.ok:
            console.print(f"[green]chain intact[/]: {v.records} records, head {v.head_hash[:16]}...",
                          highlight=False)
    if v.checked and not v.ok:
        err_console.print(f"[red]audit log broken at record {v.first_bad_seq}[/]: {v.reason}",
                          highlight=False)
        sys.exit(EXIT_FAILED)
