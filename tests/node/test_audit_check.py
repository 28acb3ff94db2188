"""A node checks the tail of its site group's audit log at every start: an edited record is
logged as a warning and shown by `mesh admin status`, and the node still starts (its log stays
as evidence, and the decisions keep working)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from click.testing import CliRunner

from mesh.cli import main as cli
from mesh.consensus.config import RaftSection
from mesh.consensus.ledger import Outcome

pytestmark = pytest.mark.asyncio


async def admin_status(node, fleet, *flags: str):
    argv = ["admin", "status", "--node", node.address, "--creds", str(fleet.operator.directory), *flags]
    return await asyncio.to_thread(CliRunner().invoke, cli, argv)


async def test_an_edited_audit_log_is_reported_at_restart_in_the_log_and_admin_status(cluster, fleet, caplog):
    c = await cluster(1, raft=RaftSection(members=["node-00"]))
    node = c.nodes["node-00"]
    await node.group.raft.wait_for_leader(30.0)
    for i in range(4):
        assert (await node.group.set_routes({f"cam-{i}": "node-00"})).outcome is Outcome.APPLIED

    shown = await admin_status(node, fleet)
    assert shown.exit_code == 0, shown.output
    assert "chain intact (checked at start)" in shown.output and "warning" not in shown.output

    path = node.group.audit_path
    await c.stop("node-00")
    lines = path.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[1])
    record["payload"]["routes"] = {"cam-0": "somewhere-else"}  # a changed record, its hash left as it was
    lines[1] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))

    caplog.set_level(logging.WARNING, logger="mesh.consensus.group")
    node = await c.add("node-00")
    await node.group.raft.wait_for_leader(30.0)
    warnings = [r.getMessage() for r in caplog.records if r.name == "mesh.consensus.group"]
    assert any(f"audit log {path}" in w and "record 2" in w and "edited" in w for w in warnings), warnings

    shown = await admin_status(node, fleet)
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert f"warning: audit log {path} on node-00 does not verify (checked at start)" in text, text
    assert "record 2 (" in text and f"mesh admin audit --verify --node {node.address}" in text
    doc = json.loads((await admin_status(node, fleet, "--json")).output)
    assert (doc["audit"]["ok"], doc["audit"]["first_bad_seq"], doc["audit"]["path"]) == (False, 2, str(path))
    # Decisions go on, and are audited after the damage.
    assert (await node.group.set_routes({"cam-9": "node-00"})).outcome is Outcome.APPLIED


async def test_a_node_without_raft_has_no_audit_check(cluster, fleet):
    c = await cluster(1)
    doc = json.loads((await admin_status(c.nodes["node-00"], fleet, "--json")).output)
    assert doc["audit"] is None
