"""Turning admin responses into tables for people and dicts for scripts."""

from __future__ import annotations

from rich.table import Table

from mesh._proto import admin_pb2 as pb
from mesh.membership.messages import State

_STATE_STYLE = {State.ALIVE: "green", State.SUSPECT: "yellow", State.DEAD: "red", State.LEFT: "dim"}


def _ago(seconds: float) -> str:
    if seconds < 0:
        return "never"
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    return f"{seconds / 60:.0f}m ago"


def status_dict(resp: pb.StatusResponse) -> dict:
    return {
        "node_id": resp.node_id,
        "address": resp.address,
        "labels": dict(resp.labels),
        "incarnation": resp.incarnation,
        "version": resp.version,
        "uptime_s": round(resp.uptime_s, 3),
        "members": [
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
            for m in resp.members
        ],
    }


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
