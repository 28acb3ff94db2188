"""The Decisions service over mTLS in front of a real 3-member site group, driven by the operator's CLI."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
import pytest_asyncio
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh._proto import decisions_pb2 as pb
from mesh._proto import decisions_pb2_grpc as pb_grpc
from mesh.cli import main as cli
from mesh.consensus.ledger import Outcome
from mesh.consensus.service import DecisionsServicer, add_to_server
from mesh.guard.approval import sign_approval
from mesh.identity.signing import KeyRole, load_signing_key
from mesh.identity.tls import channel_credentials, secure_channel_options, server_credentials
from mesh.node.local import LocalFleet, wait_for
from tests.consensus.harness import ROUTES, SiteCluster, big, move


class Served:
    """A site group whose node-0 serves Decisions on an mTLS gRPC server."""

    def __init__(
        self, members: SiteCluster, server: grpc.aio.Server, address: str, fleet: LocalFleet
    ) -> None:
        self.site, self.server, self.address, self.fleet = members, server, address, fleet
        self.group = members.groups["node-0"]
        self.key_path = fleet.directory / "operator.key"

    async def mesh(self, *args: str):
        """Run `mesh admin ...` against node-0 (in a thread: the client blocks, the server needs the loop)."""
        argv = ["admin", *args, "--node", self.address, "--creds", str(self.fleet.operator.directory)]
        return await asyncio.to_thread(CliRunner().invoke, cli, argv)

    def stub(self, creds) -> tuple[grpc.aio.Channel, pb_grpc.DecisionsStub]:
        channel = grpc.aio.secure_channel(self.address, channel_credentials(creds),
                                          options=secure_channel_options())
        return channel, pb_grpc.DecisionsStub(channel)


async def _serve(group, fleet) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add_to_server(server, group)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(fleet.node_credentials("node-a")))
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest_asyncio.fixture
async def served(site, fleet):
    s = await site(3)
    s.start_all()
    await s.wait_leader()
    await s.groups["node-0"].set_routes(ROUTES)
    server, address = await _serve(s.groups["node-0"], fleet)
    yield Served(s, server, address, fleet)
    await server.stop(grace=None)


@pytest.mark.asyncio
async def test_operator_lists_approves_and_denies_through_the_cli(served):
    held = big()
    assert (await served.site.groups["node-1"].propose(held)).outcome is Outcome.HELD
    await served.site.converged()

    result = await served.mesh("pending")
    assert result.exit_code == 0, result.output
    assert held.decision_id in result.output
    # The exact command that unblocks it.
    assert f"mesh admin approve {held.decision_id} --key {served.key_path} --node {served.address}" \
        in " ".join(result.output.split())
    result = await served.mesh("pending", "--json")
    doc = json.loads(result.stdout)
    assert doc["group"]["current"] and [h["decision_id"] for h in doc["held"]] == [held.decision_id]
    entry = doc["held"][0]
    assert entry["scope"]["streams_moved"] == 4 and entry["limits"]["max_streams"] == 3
    assert entry["proposer"] == "node-3" and entry["decision"] == held.to_dict()

    result = await served.mesh("approve", held.decision_id, "--key", str(served.key_path), "--reason", "ok")
    assert result.exit_code == 0, result.output
    assert "applied" in result.output
    await served.site.converged()
    assert all(g.routes()["cam-1"] == "node-4" for g in served.site.live())

    result = await served.mesh("routes", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["routes"]["cam-1"] == "node-4"
    result = await served.mesh("routes")
    assert result.exit_code == 0 and "cam-1" in result.output

    denied = move(("cam-6", "node-3", "node-1"), ("cam-7", "node-3", "node-2"), ("cam-8", "node-3", "node-4"),
                  nonce="big-000002")
    assert (await served.group.propose(denied)).outcome is Outcome.HELD
    result = await served.mesh("deny", denied.decision_id, "--key", str(served.key_path))
    assert result.exit_code == 2  # --reason is required
    result = await served.mesh(
        "deny", denied.decision_id[:8], "--key", str(served.key_path), "--reason", "no", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outcome"] == "denied"
    await served.site.converged()
    assert all(g.outcome_of(denied.decision_id) == "denied" for g in served.site.live())
    result = await served.mesh("approve", "0123456789abcdef", "--key", str(served.key_path))
    assert result.exit_code == 1 and "not held" in result.output
    result = await served.mesh("approve", held.decision_id, "--key", str(served.key_path))
    assert result.exit_code == 1 and "it was applied" in " ".join(result.output.split()), result.output

    result = await served.mesh("audit", "--verify", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["verdict"]["ok"]
    kinds = [(r["kind"], r["payload"].get("decision_id")) for r in doc["records"]]
    assert ("approved", held.decision_id) in kinds and ("denied", denied.decision_id) in kinds
    approved = next(r for r in doc["records"] if r["kind"] == "approved")
    assert approved["payload"]["key_id"] == served.fleet.fleet.operator_key_id
    result = await served.mesh("audit", "--verify")
    assert result.exit_code == 0 and "chain intact" in result.output

    # Someone edits record 2 of node-0's log: --verify exits 1 and names it.
    lines = served.group.audit_path.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[1])
    record["payload"]["proposer"] = "node-9"
    served.group.audit_path.write_bytes(lines[0] + json.dumps(record).encode() + b"\n" + b"".join(lines[2:]))
    result = await served.mesh("audit", "--verify")
    assert result.exit_code == 1
    assert "broken at record 2" in result.output, result.output


@pytest.mark.asyncio
async def test_errors_map_to_grpc_statuses(served):
    node_channel, node_stub = served.stub(served.fleet.node_credentials("node-b"))
    op_channel, op_stub = served.stub(served.fleet.operator)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await node_stub.Pending(pb.PendingRequest())
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED

        for bad in ("{not json", json.dumps({"decision_id": "x"}), ""):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await op_stub.Approve(pb.AnswerRequest(approval_json=bad))
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, bad
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await op_stub.Propose(pb.ProposeRequest(decision_json=json.dumps({"kind": "move_streams"})))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT

        key = load_signing_key(served.key_path, KeyRole.OPERATOR)
        never_proposed = big("never-00001")
        approval = sign_approval(key, never_proposed, now=time.time(), ttl_s=60, nonce="appr-unknown")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await op_stub.Approve(pb.AnswerRequest(approval_json=json.dumps(approval.to_dict())))
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:  # a denial sent as an approval
            denial = sign_approval(key, never_proposed, now=time.time(), ttl_s=60, nonce="deny-unknown",
                                   approve=False)
            await op_stub.Approve(pb.AnswerRequest(approval_json=json.dumps(denial.to_dict())))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT

        # An operator-proposed decision within scope is applied through the same path.
        small = move(("cam-0", "node-1", "node-2"), nonce="op-000001", proposer="node-0")
        reply = await op_stub.Propose(pb.ProposeRequest(decision_json=json.dumps(small.to_dict())))
        assert (reply.outcome, reply.decision_id) == ("applied", small.decision_id)
    finally:
        await node_channel.close()
        await op_channel.close()

    # A node without a [raft] section answers FAILED_PRECONDITION.
    server, address = await _serve(None, served.fleet)
    channel = grpc.aio.secure_channel(address, channel_credentials(served.fleet.operator),
                                      options=secure_channel_options())
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.DecisionsStub(channel).Routes(pb.RoutesRequest())
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "[raft]" in err.value.details()
    finally:
        await channel.close()
        await server.stop(grace=None)


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class _OperatorContext:
    """Just enough of a grpc.aio context for the servicer: an operator's certificate, abort raises."""

    def __init__(self, cert_pem: bytes) -> None:
        self._auth = {"x509_pem_cert": [cert_pem]}

    def auth_context(self):
        return self._auth

    async def abort(self, code, details):
        raise _Aborted(code, details)


class _NoWrites:
    group = "site-a"

    def __getattr__(self, name):
        raise AssertionError(f"malformed input reached the group ({name})")


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(st.text(max_size=200), _json_values.map(json.dumps)),
       method=st.sampled_from(["Approve", "Deny", "Propose"]))
def test_malformed_decision_and_approval_json_is_invalid_argument(fleet, text, method):
    servicer = DecisionsServicer(_NoWrites())
    context = _OperatorContext(fleet.operator.cert_path.read_bytes())
    if method == "Propose":
        request = pb.ProposeRequest(decision_json=text)
    else:
        request = pb.AnswerRequest(approval_json=text)
    with pytest.raises(_Aborted) as err:
        asyncio.run(getattr(servicer, method)(request, context))
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT, err.value


@pytest.mark.asyncio
async def test_operator_moves_streams_through_the_guard(served):
    # One stream within scope: applied at once on every replica.
    result = await served.mesh("move", "cam-0", "--to", "node-2", "--reason", "rebalance", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outcome"] == "applied"
    await served.site.converged()
    assert all(g.routes()["cam-0"] == "node-2" for g in served.site.live())
    # Four streams from two nodes: above the move_streams scope, so the operator's own move is held too.
    result = await served.mesh("move", "cam-1", "cam-2", "cam-3", "cam-4", "--to", "node-4", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["outcome"] == "held"
    await served.site.converged()
    assert all(g.held(doc["decision_id"]) is not None for g in served.site.live())
    assert all(g.routes()["cam-1"] == "node-1" for g in served.site.live())
    # Usage errors exit 2 and say why.
    result = await served.mesh("move", "cam-99", "--to", "node-4")
    assert result.exit_code == 2 and "no route for cam-99" in result.output


@pytest.mark.asyncio
async def test_a_withdrawn_decision_shows_as_withdrawn_and_an_approval_is_refused_saying_so(served):
    held = big("withdrawn-01")
    assert (await served.site.groups["node-1"].propose(held)).outcome is Outcome.HELD
    result = await served.site.groups["node-2"].withdraw(held.decision_id, "node-3 is alive again")
    assert result.outcome is Outcome.WITHDRAWN
    await served.site.converged()

    result = await served.mesh("history", "--json")
    assert result.exit_code == 0, result.output
    last = json.loads(result.stdout)[-1]
    assert (last["decision_id"], last["outcome"]) == (held.decision_id, "withdrawn")
    assert "node-3 is alive again" in last["detail"]
    result = await served.mesh("pending")
    assert result.exit_code == 0 and "nothing held" in result.output and "withdrawn" in result.output
    result = await served.mesh("audit")
    assert "withdrawn" in result.output and "node-3 is alive again" in " ".join(result.output.split())

    # The CLI will not sign it...
    result = await served.mesh("approve", held.decision_id, "--key", str(served.key_path))
    assert result.exit_code == 1 and "it was withdrawn" in " ".join(result.output.split()), result.output
    # ... and an approval sent anyway is refused by every replica, saying why.
    key = load_signing_key(served.key_path, KeyRole.OPERATOR)
    approval = sign_approval(key, held, now=time.time(), ttl_s=60, nonce="late-approval-1")
    channel, stub = served.stub(served.fleet.operator)
    try:
        reply = await stub.Approve(pb.AnswerRequest(approval_json=json.dumps(approval.to_dict())))
    finally:
        await channel.close()
    assert (reply.outcome, reply.refusal_reason) == ("refused", "withdrawn")
    assert "was withdrawn (node-3 is alive again)" in reply.message
    await served.site.converged()
    assert all(g.routes()["cam-1"] == "node-1" for g in served.site.live())


@pytest.mark.asyncio
async def test_operator_sees_each_members_raft_state_and_a_cut_off_member_says_so_at_once(served):
    result = await served.mesh("group", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    view = doc["group"]
    assert view["node_id"] == "node-0" and view["leader"] in served.site.names and view["term"] >= 1
    assert view["members"] == ["node-0", "node-1", "node-2"] and view["reachable"] == ["node-1", "node-2"]
    assert view["commit_index"] >= view["applied_index"] >= 1  # the routes at least
    assert not view["cut_off"] and view["leader_contact_s"] < view["no_leader_after_s"]
    links = [(link["node_id"], link["reachable"]) for link in doc["links"]]
    assert links == [("node-1", True), ("node-2", True)]
    assert [link["node_id"] for link in doc["links"] if link["leader"]] == (
        [view["leader"]] if view["leader"] != "node-0" else [])
    result = await served.mesh("group")
    assert result.exit_code == 0 and "Raft group site-a as seen by node-0" in result.output
    result = await served.mesh("pending")
    text = " ".join(result.output.split())
    assert f"leader {view['leader']}, term" in text and "2/2 members reachable" in text

    # node-0 is cut off from the other two.
    node_0 = served.group
    node_0.raft.cut("node-1", "node-2")
    for name in ("node-1", "node-2"):
        served.site.groups[name].raft.cut("node-0")
    await wait_for(node_0.raft.cut_off, 10.0, "node-0 knows it is cut off")
    result = await served.mesh("group", "--json")
    assert result.exit_code == 1  # a script can tell
    view = json.loads(result.stdout)["group"]
    assert view["cut_off"] and view["reachable"] == []
    assert view["leader_contact_s"] > view["no_leader_after_s"]
    result = await served.mesh("group")
    assert result.exit_code == 1 and "cut off" in result.output
    # Reads answer from the last committed state and say so; writes fail naming the minority.
    result = await served.mesh("pending", "--json")
    doc = json.loads(result.stdout)
    assert not doc["group"]["current"] and "no leader heard from" in doc["group"]["note"]
    result = await served.mesh("move", "cam-0", "--to", "node-2")
    assert result.exit_code == 1 and "FAILED_PRECONDITION" in result.output
    assert "this member is in a minority" in " ".join(result.output.split())

    for g in served.site.groups.values():
        g.raft.heal()
    await wait_for(lambda: not node_0.raft.cut_off(), 10.0, "node-0 hears from a leader again")
    result = await served.mesh("group", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["group"]["reachable"] == ["node-1", "node-2"]
