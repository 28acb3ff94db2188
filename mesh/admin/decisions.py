"""Operator commands for a site's local decisions: pending, approve, deny, routes, audit.

Approvals are signed here, with the operator key on the operator's machine; the node only
ever sees the signed approval. `register(admin)` adds the commands to `mesh admin`.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path

import click
from rich.table import Table

from mesh._proto import decisions_pb2 as pb
from mesh._proto import decisions_pb2_grpc as pb_grpc
from mesh.admin.client import AdminError, OperatorClient
from mesh.identity.ca import Credentials

DEFAULT_APPROVAL_TTL_S = 600.0


class DecisionsError(AdminError):
    """A Decisions call failed; `.code` is the gRPC status (None for client-side problems)."""


class DecisionsClient(OperatorClient):
    """Blocking client of a node's Decisions service (operator certificate required)."""

    error = DecisionsError
    stub_class = pb_grpc.DecisionsStub

    def __init__(self, address: str, credentials: Credentials, *, timeout_s: float = 8.0) -> None:
        super().__init__(address, credentials, timeout_s=timeout_s)

    def pending(self) -> pb.PendingResponse:
        return self._call(self._stub.Pending, pb.PendingRequest())

    def routes(self) -> pb.RoutesResponse:
        return self._call(self._stub.Routes, pb.RoutesRequest())

    def propose(self, decision_doc: dict) -> pb.DecisionResult:
        return self._call(self._stub.Propose, pb.ProposeRequest(decision_json=json.dumps(decision_doc)))

    def approve(self, approval_doc: dict) -> pb.DecisionResult:
        return self._call(self._stub.Approve, pb.AnswerRequest(approval_json=json.dumps(approval_doc)))

    def deny(self, approval_doc: dict) -> pb.DecisionResult:
        return self._call(self._stub.Deny, pb.AnswerRequest(approval_json=json.dumps(approval_doc)))

    def audit(self, *, verify: bool = False, limit: int = 0) -> pb.AuditResponse:
        return self._call(self._stub.Audit, pb.AuditRequest(verify=verify, limit=limit))


# --- formatting ------------------------------------------------------------------------------


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _view_dict(view: pb.GroupView) -> dict:
    return {"group": view.group, "node_id": view.node_id, "leader": view.leader or None, "current": view.current,
            "note": view.note, "group_size": view.group_size, "applied_index": view.applied_index}


def _held_dict(h: pb.HeldDecisionInfo, now: float) -> dict:
    return {"decision_id": h.decision_id, "kind": h.kind, "proposer": h.proposer, "reason": h.reason,
            "describe": h.describe, "age_s": round(now - h.held_at, 1),
            "expires_in_s": round(h.expires_at - now, 1),
            "scope": {"nodes_affected": h.nodes_affected, "fraction_of_group": h.fraction_of_group,
                      "streams_moved": h.streams_moved},
            "limits": {"max_nodes": h.max_nodes, "max_fraction": h.max_fraction, "max_streams": h.max_streams},
            "exceeded": list(h.exceeded), "waiting_for": h.waiting_for, "digest": h.digest,
            "decision": json.loads(h.decision_json)}


def _scope_cell(h: pb.HeldDecisionInfo) -> str:
    def part(value: str, limit: str, over: bool) -> str:
        text = f"{value}/{limit}"
        return f"[red]{text}[/]" if over else text

    return ", ".join([
        part(f"{h.nodes_affected} nodes", str(h.max_nodes), h.nodes_affected > h.max_nodes),
        part(f"{h.fraction_of_group:.0%}", f"{h.max_fraction:.0%}", h.fraction_of_group > h.max_fraction + 1e-9),
        part(f"{h.streams_moved} streams", str(h.max_streams), h.streams_moved > h.max_streams),
    ])


def _stale_note(console, view: pb.GroupView) -> None:
    if not view.current:
        console.print(f"[yellow]warning:[/] {view.note}", highlight=False)


def _unblock_commands(decision_id: str, address: str, creds_dir: Path) -> tuple[str, str]:
    target = f"--node {address}" + (f" --creds {creds_dir}" if str(creds_dir) != "fleet/operators/admin" else "")
    return (f"mesh admin approve {decision_id} --key fleet/operator.key {target}",
            f"mesh admin deny {decision_id} --key fleet/operator.key --reason '...' {target}")


# --- commands --------------------------------------------------------------------------------


def client_name(creds_dir: Path) -> str:
    """The operator's name from its certificate (the proposer of an operator decision)."""
    from mesh.identity.ca import load_credentials

    return load_credentials(creds_dir).name


def _client(address: str, creds_dir: Path) -> DecisionsClient:
    from mesh.cli import _admin_client

    return _admin_client(address, creds_dir, DecisionsClient)


def _call(address: str, creds_dir: Path, call):
    from mesh.cli import _admin_call

    return _admin_call(address, creds_dir, call, DecisionsClient)


def _result_exit(result: pb.DecisionResult, as_json: bool) -> None:
    from mesh.cli import EXIT_FAILED, _emit_json, console, err_console

    doc = {"outcome": result.outcome, "decision_id": result.decision_id, "message": result.message,
           "refusal_reason": result.refusal_reason or None, "group": _view_dict(result.group)}
    if as_json:
        _emit_json(doc)
    elif result.outcome == "refused":
        err_console.print(f"[red]refused:[/] {result.message} (reason: {result.refusal_reason}); the refusal "
                          "is in every replica's audit log", highlight=False)
    else:
        style = {"applied": "green", "denied": "yellow", "held": "yellow"}.get(result.outcome, "bold")
        console.print(f"[{style}]{result.message}[/] (group {result.group.group}, asked {result.group.node_id})",
                      highlight=False)
    if result.outcome == "refused":
        sys.exit(EXIT_FAILED)


def _find_held(client: DecisionsClient, decision_id: str):
    """The held decision named by `decision_id` (or a unique prefix of at least 6 characters)."""
    from mesh.cli import _fail

    resp = client.pending()
    matches = [h for h in resp.held if h.decision_id == decision_id]
    if not matches and len(decision_id) >= 6:
        matches = [h for h in resp.held if h.decision_id.startswith(decision_id)]
    if len(matches) > 1:
        _fail(f"{decision_id} matches {len(matches)} held decisions; give more characters of the id")
    if not matches:
        finished = [e for e in resp.recent if e.decision_id and e.decision_id.startswith(decision_id)
                    and e.outcome != "refused"]
        if finished:
            e = finished[-1]
            _fail(f"decision {e.decision_id} is no longer held: it was {e.outcome} ({e.detail})")
        held = ", ".join(h.decision_id for h in resp.held) or "none"
        _fail(f"decision {decision_id} is not held in group {resp.group.group} on {client.address} "
              f"(held: {held}); see `mesh admin pending --node {client.address}`")
    return matches[0]


def _sign(held: pb.HeldDecisionInfo, key_path: Path, *, approve: bool, ttl_s: float, reason: str):
    from mesh.cli import _fail
    from mesh.guard.approval import sign_approval
    from mesh.guard.core import Decision, DecisionError
    from mesh.identity.signing import IdentityError, KeyRole, load_signing_key

    try:
        decision = Decision.from_dict(json.loads(held.decision_json))
    except (ValueError, DecisionError) as exc:
        _fail(f"the node sent a decision that does not parse ({exc}); not signing it")
    if decision.decision_id != held.decision_id:
        _fail(f"the node sent decision {decision.decision_id} for id {held.decision_id}; not signing it")
    try:
        key = load_signing_key(key_path, KeyRole.OPERATOR)
    except IdentityError as exc:
        _fail(str(exc))
    return decision, sign_approval(key, decision, now=time.time(), ttl_s=ttl_s,
                                   nonce=secrets.token_urlsafe(18), approve=approve, reason=reason)


def register(admin_group: click.Group) -> None:
    """Add pending, approve, deny, routes and audit to `mesh admin`."""
    from mesh.cli import _CONTEXT, _admin_options

    @admin_group.command("pending", context_settings=_CONTEXT, epilog=(
        "Examples:\n\n  mesh admin pending --node 127.0.0.1:7000\n\n"
        "  mesh admin pending --node 127.0.0.1:7000 --json | jq '.held[].decision_id'"))
    @_admin_options
    def pending(address: str, creds_dir: Path, as_json: bool) -> None:
        """Decisions of NODE's site group held for an operator: id, kind, scope vs limit, proposer, age."""
        from mesh.cli import _emit_json, console

        resp = _call(address, creds_dir, lambda client: client.pending())
        now = time.time()
        if as_json:
            _emit_json({"group": _view_dict(resp.group), "held": [_held_dict(h, now) for h in resp.held],
                        "recent": [{"decision_id": e.decision_id or None, "outcome": e.outcome, "at": e.at,
                                    "detail": e.detail, "key_id": e.key_id or None} for e in resp.recent]})
            return
        _stale_note(console, resp.group)
        table = Table(title=f"held decisions of group {resp.group.group} (asked {resp.group.node_id}, "
                            f"leader {resp.group.leader or 'unknown'})", title_justify="left")
        for column in ("id", "kind", "scope (value/limit)", "proposer", "age", "expires in", "reason"):
            table.add_column(column)
        for h in resp.held:
            table.add_row(h.decision_id, h.kind, _scope_cell(h), h.proposer, _ago(now - h.held_at),
                          _ago(h.expires_at - now), h.reason)
        if not resp.held:
            table.add_row("-", "nothing held", "", "", "", "", "")
        console.print(table)
        for h in resp.held:
            approve_cmd, deny_cmd = _unblock_commands(h.decision_id, address, creds_dir)
            console.print(f"[yellow]{h.decision_id}[/] {h.describe}\n  waits for an operator: "
                          f"{'; '.join(h.exceeded)}\n  approve: {approve_cmd}\n  deny:    {deny_cmd}",
                          highlight=False)

    @admin_group.command("approve", context_settings=_CONTEXT, epilog=(
        "Example:\n\n  mesh admin approve 3f9a0c1d2e4b5a69 --key fleet/operator.key --node 127.0.0.1:7000\n\n"
        "The approval is signed here with the operator key; the node never sees the key. Every replica "
        "of the group checks the signature before it applies the decision."))
    @click.argument("decision_id")
    @click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="The operator signing key (operator.key from `mesh fleet init`).")
    @click.option("--ttl-s", type=click.FloatRange(1.0, 7 * 24 * 3600.0), default=DEFAULT_APPROVAL_TTL_S,
                  show_default=True, help="How long the signed approval stays valid.")
    @click.option("--reason", default="", help="Why (goes to the audit log).")
    @_admin_options
    def approve(decision_id: str, key_path: Path, ttl_s: float, reason: str, address: str, creds_dir: Path,
                as_json: bool) -> None:
        """Sign an approval of held decision DECISION_ID with the operator key and send it."""
        _answer(decision_id, key_path, ttl_s, reason, address, creds_dir, as_json, approve=True)

    @admin_group.command("deny", context_settings=_CONTEXT, epilog=(
        "Example:\n\n  mesh admin deny 3f9a0c1d2e4b5a69 --key fleet/operator.key --reason 'cam-7 is in "
        "maintenance' --node 127.0.0.1:7000"))
    @click.argument("decision_id")
    @click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="The operator signing key (operator.key from `mesh fleet init`).")
    @click.option("--reason", required=True, help="Why it is denied (goes to the audit log).")
    @click.option("--ttl-s", type=click.FloatRange(1.0, 7 * 24 * 3600.0), default=DEFAULT_APPROVAL_TTL_S,
                  show_default=True, help="How long the signed denial stays valid.")
    @_admin_options
    def deny(decision_id: str, key_path: Path, reason: str, ttl_s: float, address: str, creds_dir: Path,
             as_json: bool) -> None:
        """Sign a denial of held decision DECISION_ID: it is finished on every replica, never applied."""
        _answer(decision_id, key_path, ttl_s, reason, address, creds_dir, as_json, approve=False)

    @admin_group.command("move", context_settings=_CONTEXT, epilog=(
        "Examples:\n\n  mesh admin move cam-17a --to cam-gw-02 --node 127.0.0.1:7000 --reason 'rebalance'\n\n"
        "  mesh admin move cam-17a cam-17b --to cam-gw-02 --node 127.0.0.1:7000\n\n"
        "The move is a decision like any other: the guard applies it if its scope is within the "
        "policy, else it is held and `mesh admin approve` unblocks it."))
    @click.argument("streams", nargs=-1, required=True)
    @click.option("--to", "to_node", required=True, help="Node id that is to serve the streams.")
    @click.option("--reason", default="operator request", show_default=True, help="Why (goes to the audit log).")
    @_admin_options
    def move(streams: tuple[str, ...], to_node: str, reason: str, address: str, creds_dir: Path,
             as_json: bool) -> None:
        """Propose moving STREAMS to another node of NODE's site group (an operator decision)."""
        from mesh.cli import EXIT_USAGE, _fail
        from mesh.guard.core import Decision, DecisionError, DecisionKind, StreamMove

        with _client(address, creds_dir) as client:
            try:
                current = client.routes()
                unknown = [s for s in streams if s not in current.routes]
                if unknown:
                    _fail(f"no route for {', '.join(unknown)} in group {current.group.group}; "
                          "`mesh admin routes` lists the streams", EXIT_USAGE)
                moves = tuple(StreamMove(s, current.routes[s], to_node) for s in streams
                              if current.routes[s] != to_node)
                if not moves:
                    _fail(f"{', '.join(streams)} already served by {to_node}", EXIT_USAGE)
                try:
                    decision = Decision(kind=DecisionKind.MOVE_STREAMS, group=current.group.group,
                                        proposer=client_name(creds_dir), reason=reason, proposed_at=time.time(),
                                        nonce=secrets.token_hex(8), moves=moves)
                except DecisionError as exc:
                    _fail(str(exc), EXIT_USAGE)
                result = client.propose(decision.to_dict())
            except AdminError as exc:
                _fail(str(exc))
        _result_exit(result, as_json)

    @admin_group.command("routes", context_settings=_CONTEXT, epilog=(
        "Examples:\n\n  mesh admin routes --node 127.0.0.1:7000\n\n"
        "  mesh admin routes --node 127.0.0.1:7000 --json | jq '.routes'"))
    @_admin_options
    def routes(address: str, creds_dir: Path, as_json: bool) -> None:
        """The routing table of NODE's site group (stream -> serving node) and per-node allocations."""
        from mesh.cli import _emit_json, console

        resp = _call(address, creds_dir, lambda client: client.routes())
        if as_json:
            _emit_json({"group": _view_dict(resp.group), "routes": dict(resp.routes),
                        "allocations": dict(resp.allocations)})
            return
        _stale_note(console, resp.group)
        table = Table(title=f"routes of group {resp.group.group} ({len(resp.routes)} streams, asked "
                            f"{resp.group.node_id})", title_justify="left")
        table.add_column("stream")
        table.add_column("serving node")
        table.add_column("node slots", justify="right")
        for stream in sorted(resp.routes):
            node = resp.routes[stream]
            slots = resp.allocations.get(node)
            table.add_row(stream, node, "" if slots is None else str(slots))
        if not resp.routes:
            table.add_row("-", "no routes yet", "")
        console.print(table)
        unrouted = sorted(set(resp.allocations) - set(resp.routes.values()))
        if unrouted:
            console.print("allocations of nodes serving nothing: "
                          + ", ".join(f"{n}={resp.allocations[n]}" for n in unrouted), highlight=False)

    @admin_group.command("audit", context_settings=_CONTEXT, epilog=(
        "Examples:\n\n  mesh admin audit --node 127.0.0.1:7000 --limit 20\n\n"
        "  mesh admin audit --node 127.0.0.1:7000 --verify   # exit 1 and the first bad record if broken"))
    @click.option("--verify", is_flag=True, help="Check the hash chain; exit 1 naming the first bad record.")
    @click.option("--limit", type=click.IntRange(0, 1_000_000), default=50, show_default=True,
                  help="Show the last N records (0: all).")
    @_admin_options
    def audit(verify: bool, limit: int, address: str, creds_dir: Path, as_json: bool) -> None:
        """NODE's audit log of its group's decisions: proposals, holds, approvals, denials, refusals, applies."""
        from mesh.cli import EXIT_FAILED, _emit_json, console, err_console

        resp = _call(address, creds_dir, lambda client: client.audit(verify=verify, limit=limit))
        v = resp.verdict
        verdict = None
        if v.checked:
            verdict = {"ok": v.ok, "records": v.records, "first_bad_seq": v.first_bad_seq or None,
                       "reason": v.reason, "head_hash": v.head_hash}
        if as_json:
            _emit_json({"node_id": resp.group.node_id, "group": resp.group.group, "path": resp.path,
                        "total_records": resp.total_records, "verdict": verdict,
                        "records": [{"seq": r.seq, "time": r.time, "kind": r.kind,
                                     "payload": json.loads(r.payload_json), "prev": r.prev, "hash": r.hash}
                                    for r in resp.records]})
        else:
            table = Table(title=f"audit log of {resp.group.node_id} ({resp.path}): last {len(resp.records)} of "
                                f"{resp.total_records}", title_justify="left")
            for column in ("seq", "time (UTC)", "kind", "decision", "detail"):
                table.add_column(column, justify="right" if column == "seq" else "left")
            for r in resp.records:
                payload = json.loads(r.payload_json)
                table.add_row(str(r.seq), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.time)), r.kind,
                              str(payload.get("decision_id") or ""), _audit_detail(r.kind, payload))
            console.print(table)
            if verdict is not None and v.ok:
                console.print(f"[green]chain intact[/]: {v.records} records, head {v.head_hash[:16]}...",
                              highlight=False)
        if verdict is not None and not v.ok:
            err_console.print(f"[red]audit log broken at record {v.first_bad_seq}[/]: {v.reason}", highlight=False)
            sys.exit(EXIT_FAILED)


def _audit_detail(kind: str, payload: dict) -> str:
    if kind == "refused":
        key = f" key {payload['key_id']}" if payload.get("key_id") else ""
        return f"{payload.get('reason')}{key}: {payload.get('message', '')}"
    if kind in ("approved", "denied"):
        return f"key {payload.get('key_id')}" + (f": {payload['reason']}" if payload.get("reason") else "")
    if kind == "held":
        return "; ".join(payload.get("exceeded", []))
    if kind == "proposed":
        return f"{payload.get('kind')} by {payload.get('proposer')}: {payload.get('reason', '')}"
    if kind == "applied":
        moves = ", ".join(f"{m['stream']} {m['from']}->{m['to']}" for m in payload.get("moves", []))
        allocs = ", ".join(f"{a['node']}={a['slots']}" for a in payload.get("allocations", []))
        by = payload.get("approved_by")
        return (moves or allocs) + (f" (approved by key {by})" if by else " (within scope)")
    rest = {k: v for k, v in payload.items() if k not in ("raft_index", "raft_event", "at", "decision_id")}
    return json.dumps(rest, sort_keys=True)[:120]


def _answer(decision_id: str, key_path: Path, ttl_s: float, reason: str, address: str, creds_dir: Path,
            as_json: bool, *, approve: bool) -> None:
    from mesh.cli import _fail

    with _client(address, creds_dir) as client:
        try:
            held = _find_held(client, decision_id)
            _, approval = _sign(held, key_path, approve=approve, ttl_s=ttl_s, reason=reason)
            send = client.approve if approve else client.deny
            result = send(approval.to_dict())
        except AdminError as exc:
            _fail(str(exc))
    _result_exit(result, as_json)
