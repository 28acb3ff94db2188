"""Turning admin and decisions responses into tables for people and dicts for scripts."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.table import Table

from mesh._proto import admin_pb2 as pb
from mesh._proto import decisions_pb2 as decisions_pb
from mesh.membership.messages import State

_STATE_STYLE = {State.ALIVE: "green", State.SUSPECT: "yellow", State.DEAD: "red", State.LEFT: "dim"}


def _ago(seconds: float) -> str:
    if seconds < 0:
        return "never"
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    return f"{seconds / 60:.0f}m ago"


def _member_dicts(members) -> list[dict]:
    return [
        {
            "node_id": m.node_id,
            "address": m.address,
            "site": m.labels.get("site", ""),
            "labels": dict(m.labels),
            "state": State(m.state).name.lower(),
            "incarnation": m.incarnation,
            "last_heard_s_ago": None if m.last_heard_s_ago < 0 else round(m.last_heard_s_ago, 3),
            "state_age_s": round(m.state_age_s, 3),
        }
        for m in members
    ]


def status_dict(resp: pb.StatusResponse) -> dict:
    doc = {
        "node_id": resp.node_id,
        "address": resp.address,
        "labels": dict(resp.labels),
        "incarnation": resp.incarnation,
        "version": resp.version,
        "uptime_s": round(resp.uptime_s, 3),
        "pools": resp.pools or "flat",
        "members": _member_dicts(resp.members),
    }
    if resp.pools == "sites":
        doc["representatives"] = list(resp.representatives)
        doc["representative"] = resp.representative
        doc["federation"] = _member_dicts(resp.federation) if resp.representative else None
    return doc


def federation_line(resp: pb.StatusResponse) -> str | None:
    """Sites mode, in one line: the site's representatives and, on one, the federation it sees."""
    if resp.pools != "sites":
        return None
    site = resp.labels.get("site", "")
    reps = ", ".join(resp.representatives) or "none yet"
    line = f"pools: sites; representatives of site {site}: {reps}"
    if not resp.representative:
        return line + f" ({resp.node_id} is not one: it sees its site only)"
    live = [m for m in resp.federation if State(m.state) in (State.ALIVE, State.SUSPECT)]
    sites = sorted({m.labels.get("site", "") for m in live})
    return (line + f"; {resp.node_id} is one: federation pool {len(live)} live members in "
            f"{len(sites)} sites ({', '.join(sites)})")


def status_table(resp: pb.StatusResponse) -> Table:
    counts = {s: 0 for s in State}
    for m in resp.members:
        counts[State(m.state)] += 1
    summary = ", ".join(f"{n} {s.name.lower()}" for s, n in counts.items() if n)
    table = Table(title=f"fleet as seen by {resp.node_id} ({resp.address}): {summary}", title_justify="left")
    for column in ("id", "address", "site", "state", "incarnation", "last heard"):
        table.add_column(column, justify="right" if column == "incarnation" else "left")
    for m in resp.members:
        state = State(m.state)
        me = m.node_id == resp.node_id
        table.add_row(m.node_id + (" (self)" if me else ""), m.address, m.labels.get("site", ""),
                      f"[{_STATE_STYLE[state]}]{state.name.lower()}[/]", str(m.incarnation),
                      "-" if me else _ago(m.last_heard_s_ago))
    return table


def versions_table(rows: list[dict], *, title: str) -> Table:
    """Model versions with progress, from store statuses or admin Models rows."""
    table = Table(title=title, title_justify="left")
    for column in ("name", "version", "phase", "chunks", "bytes", "origin", "note"):
        table.add_column(column, justify="right" if column in ("chunks", "bytes") else "left")
    for r in rows:
        have, total = int(r.get("have_chunks", 0)), int(r.get("total_chunks", 0))
        size, held = int(r.get("size_bytes", 0)), int(r.get("bytes_have", 0))
        phase = r.get("phase", "")
        style = {"complete": "green", "failed": "red"}.get(phase, "yellow")
        table.add_row(r["name"], r["version"], f"[{style}]{phase}[/]", f"{have}/{total}",
                      f"{held:,}/{size:,}", "yes" if r.get("origin") else "", r.get("error", ""))
    if not rows:
        table.add_row("-", "-", "no versions", "", "", "", "")
    return table


# --- decisions of a site group ---------------------------------------------------------------


def short_age(seconds: float) -> str:
    """A duration as an operator reads it in a table column: 42s, 17m, 3.5h."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def group_view_dict(view: decisions_pb.GroupView) -> dict[str, Any]:
    return {"group": view.group, "node_id": view.node_id, "leader": view.leader or None,
            "current": view.current, "note": view.note, "group_size": view.group_size,
            "applied_index": view.applied_index, "term": view.term, "commit_index": view.commit_index,
            "raft_state": view.raft_state or None, "members": list(view.members),
            "reachable": list(view.reachable), "leader_contact_s": round(view.leader_contact_s, 3),
            "cut_off": view.cut_off, "no_leader_after_s": view.no_leader_after_s}


def raft_line(view: decisions_pb.GroupView) -> str:
    """One line of the answering member's Raft state, for the header of decision tables:
    leader, term, commit/applied index, reachable members, and how long since a leader was heard."""
    others = max(0, len(view.members) - 1)
    reachable = f"{len(view.reachable)}/{others} members reachable"
    if view.raft_state == "leader":
        contact = "this member leads"
    else:
        contact = f"leader last heard {view.leader_contact_s:.1f}s ago"
    text = (f"{view.node_id} is {view.raft_state or 'unknown'}; leader {view.leader or 'unknown'}, "
            f"term {view.term}, commit {view.commit_index}, applied {view.applied_index}, {reachable}, "
            f"{contact}")
    if view.cut_off:
        text += (f" [red](cut off: no leader for over {view.no_leader_after_s:.1f}s; proposals through it "
                 "fail until the partition heals)[/]")
    return text


def stale_note(view: decisions_pb.GroupView) -> str | None:
    """The warning to print when the node answered from its last committed state (no leader reachable)."""
    return None if view.current else view.note


def held_dict(h: decisions_pb.HeldDecisionInfo, now: float) -> dict[str, Any]:
    return {"decision_id": h.decision_id, "kind": h.kind, "proposer": h.proposer, "reason": h.reason,
            "describe": h.describe, "age_s": round(now - h.held_at, 1),
            "expires_in_s": round(h.expires_at - now, 1),
            "scope": {"nodes_affected": h.nodes_affected, "fraction_of_group": h.fraction_of_group,
                      "streams_moved": h.streams_moved},
            "limits": {"max_nodes": h.max_nodes, "max_fraction": h.max_fraction,
                       "max_streams": h.max_streams},
            "exceeded": list(h.exceeded), "waiting_for": h.waiting_for, "digest": h.digest,
            "decision": json.loads(h.decision_json)}


def pending_dict(resp: decisions_pb.PendingResponse, now: float) -> dict[str, Any]:
    return {"group": group_view_dict(resp.group), "held": [held_dict(h, now) for h in resp.held],
            "recent": [{"decision_id": e.decision_id or None, "outcome": e.outcome, "at": e.at,
                        "detail": e.detail, "key_id": e.key_id or None} for e in resp.recent]}


def _scope_cell(h: decisions_pb.HeldDecisionInfo) -> str:
    def part(value: str, limit: str, over: bool) -> str:
        text = f"{value}/{limit}"
        return f"[red]{text}[/]" if over else text

    return ", ".join([
        part(f"{h.nodes_affected} nodes", str(h.max_nodes), h.nodes_affected > h.max_nodes),
        part(f"{h.fraction_of_group:.0%}", f"{h.max_fraction:.0%}",
             h.fraction_of_group > h.max_fraction + 1e-9),
        part(f"{h.streams_moved} streams", str(h.max_streams), h.streams_moved > h.max_streams),
    ])


def held_table(resp: decisions_pb.PendingResponse, now: float) -> Table:
    """Held decisions of a group: id, kind, scope against its limit, proposer, age, expiry, reason;
    the title names the group and the answering member's Raft state (`raft_line`)."""
    table = Table(title=f"held decisions of group {resp.group.group}\n{raft_line(resp.group)}",
                  title_justify="left")
    for column in ("id", "kind", "scope (value/limit)", "proposer", "age", "expires in", "reason"):
        table.add_column(column)
    for h in resp.held:
        table.add_row(h.decision_id, h.kind, _scope_cell(h), h.proposer, short_age(now - h.held_at),
                      short_age(h.expires_at - now), h.reason)
    if not resp.held:
        table.add_row("-", "nothing held", "", "", "", "", "")
    return table


def recent_table(resp: decisions_pb.PendingResponse) -> Table | None:
    """The latest outcomes (applied, denied, expired, refused, withdrawn, member_removed), oldest first;
    None if none."""
    if not resp.recent:
        return None
    table = Table(title="recent outcomes", title_justify="left")
    for column in ("time (UTC)", "decision", "outcome", "detail"):
        table.add_column(column)
    style = {"applied": "green", "denied": "yellow", "refused": "red", "withdrawn": "cyan", "expired": "dim",
             "member_removed": "magenta"}
    for e in resp.recent:
        table.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.at)), e.decision_id or "-",
                      f"[{style.get(e.outcome, 'bold')}]{e.outcome}[/]", e.detail)
    return table


def group_status_dict(resp: decisions_pb.GroupStatusResponse) -> dict[str, Any]:
    return {"group": group_view_dict(resp.group), "log_entries": resp.log_entries, "held": resp.held,
            "audit_error": resp.audit_error or None,
            "links": [{"node_id": link.node_id, "reachable": link.reachable, "leader": link.leader,
                       "last_heard_s": None if link.last_heard_s < 0 else round(link.last_heard_s, 3)}
                      for link in resp.links]}


def group_status_table(resp: decisions_pb.GroupStatusResponse) -> Table:
    """A member's view of its Raft group: the state line, then one row per other member."""
    view = resp.group
    table = Table(title=f"Raft group {view.group} as seen by {view.node_id}\n{raft_line(view)}\n"
                        f"{resp.held} held, {resp.log_entries} log entries",
                  title_justify="left")
    for column in ("member", "role", "link", "last heard"):
        table.add_column(column)
    role = "leader" if view.raft_state == "leader" else view.raft_state
    table.add_row(f"{view.node_id} (self)", role, "-", "-")
    for link in resp.links:
        table.add_row(link.node_id, "leader" if link.leader else "",
                      "[green]up[/]" if link.reachable else "[red]down[/]",
                      "never" if link.last_heard_s < 0 else f"{link.last_heard_s:.1f}s ago")
    return table


def result_dict(result: decisions_pb.DecisionResult) -> dict[str, Any]:
    return {"outcome": result.outcome, "decision_id": result.decision_id, "message": result.message,
            "refusal_reason": result.refusal_reason or None, "group": group_view_dict(result.group)}


def routes_dict(resp: decisions_pb.RoutesResponse) -> dict[str, Any]:
    return {"group": group_view_dict(resp.group), "routes": dict(resp.routes),
            "allocations": dict(resp.allocations)}


def routes_table(resp: decisions_pb.RoutesResponse) -> Table:
    """A group's routing table (stream -> serving node) with each serving node's slots."""
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
    return table


def unrouted_note(resp: decisions_pb.RoutesResponse) -> str | None:
    """Allocations of nodes that serve no stream, as one line (None if there are none)."""
    unrouted = sorted(set(resp.allocations) - set(resp.routes.values()))
    if not unrouted:
        return None
    return "allocations of nodes serving nothing: " + ", ".join(
        f"{n}={resp.allocations[n]}" for n in unrouted)


def audit_verdict_dict(resp: decisions_pb.AuditResponse) -> dict[str, Any] | None:
    """The hash-chain check's verdict (None when it was not asked for)."""
    v = resp.verdict
    if not v.checked:
        return None
    return {"ok": v.ok, "records": v.records, "first_bad_seq": v.first_bad_seq or None, "reason": v.reason,
            "head_hash": v.head_hash}


def audit_dict(resp: decisions_pb.AuditResponse) -> dict[str, Any]:
    return {"node_id": resp.group.node_id, "group": resp.group.group, "path": resp.path,
            "total_records": resp.total_records, "verdict": audit_verdict_dict(resp),
            "records": [{"seq": r.seq, "time": r.time, "kind": r.kind, "payload": json.loads(r.payload_json),
                         "prev": r.prev, "hash": r.hash} for r in resp.records]}


def audit_table(resp: decisions_pb.AuditResponse) -> Table:
    """The last records of a node's audit log: seq, time, kind, decision and what happened."""
    table = Table(title=f"audit log of {resp.group.node_id} ({resp.path}): last {len(resp.records)} of "
                        f"{resp.total_records}", title_justify="left")
    for column in ("seq", "time (UTC)", "kind", "decision", "detail"):
        table.add_column(column, justify="right" if column == "seq" else "left")
    for r in resp.records:
        payload = json.loads(r.payload_json)
        table.add_row(str(r.seq), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.time)), r.kind,
                      str(payload.get("decision_id") or ""), _audit_detail(r.kind, payload))
    return table


def _audit_detail(kind: str, payload: dict[str, Any]) -> str:
    if kind == "refused":
        key = f" key {payload['key_id']}" if payload.get("key_id") else ""
        return f"{payload.get('reason')}{key}: {payload.get('message', '')}"
    if kind in ("approved", "denied"):
        return f"key {payload.get('key_id')}" + (f": {payload['reason']}" if payload.get("reason") else "")
    if kind == "held":
        return "; ".join(payload.get("exceeded", []))
    if kind == "withdrawn":
        return f"{payload.get('kind')}: {payload.get('reason', '')}"
    if kind == "member_removed":
        return (f"{payload.get('node_id')} revoked by operator key {payload.get('key_id')}: "
                f"{payload.get('reason')}")
    if kind == "duplicate":
        held_as = payload.get("held_as")
        return f"{payload.get('kind')} by {payload.get('proposer')}: same change as held {held_as}"
    if kind == "proposed":
        return f"{payload.get('kind')} by {payload.get('proposer')}: {payload.get('reason', '')}"
    if kind == "applied":
        moves = ", ".join(f"{m['stream']} {m['from']}->{m['to']}" for m in payload.get("moves", []))
        allocs = ", ".join(f"{a['node']}={a['slots']}" for a in payload.get("allocations", []))
        by = payload.get("approved_by")
        return (moves or allocs) + (f" (approved by key {by})" if by else " (within scope)")
    rest = {k: v for k, v in payload.items() if k not in ("raft_index", "raft_event", "at", "decision_id")}
    return json.dumps(rest, sort_keys=True)[:120]
