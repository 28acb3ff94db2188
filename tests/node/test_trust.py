"""A captured device against real nodes on loopback (issue 11): revoked everywhere, expired refused,
no start with someone else's certificate or a readable key, TLS on every listening socket, and no
code run from network bytes on any decoding path."""

from __future__ import annotations

import asyncio
import datetime
import json
import pickle
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh._proto import (
    decisions_pb2,
    decisions_pb2_grpc,
    membership_pb2,
    membership_pb2_grpc,
    raft_pb2,
    raft_pb2_grpc,
    transfer_pb2,
    transfer_pb2_grpc,
    trust_pb2,
    trust_pb2_grpc,
)
from mesh.consensus.config import RaftSection
from mesh.consensus.transport import GROUP_KEY
from mesh.identity.ca import Credentials, Role, san_names
from mesh.identity.revocation import sign_revocation
from mesh.identity.signing import KeyRole, load_signing_key
from mesh.identity.tls import channel_credentials, secure_channel_options
from mesh.membership.messages import State
from mesh.node.local import FAST_TIMINGS, LocalCluster, wait_for
from mesh.node.runtime import Node, NodeStartError


def channel(creds: Credentials, node) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(node.address, channel_credentials(creds),
                                   options=secure_channel_options(Role.NODE, node.config.node_id))


async def revoke(fleet, node, node_id: str, key_file: str = "operator.key", role=KeyRole.OPERATOR):
    key = load_signing_key(fleet.directory / key_file, role)
    revocation = sign_revocation(key, node_id, reason="stolen from the berlin site", now=time.time())
    async with channel(fleet.operator, node) as ch:
        return await trust_pb2_grpc.TrustStub(ch).Revoke(
            trust_pb2.RevokeRequest(revocation_json=revocation.to_json()), timeout=5)


async def ping_as(creds: Credentials, node, sender: str) -> grpc.StatusCode:
    async with channel(creds, node) as ch:
        try:
            await membership_pb2_grpc.MembershipStub(ch).Ping(
                membership_pb2.Ping(sender=sender, target=node.config.node_id, seq=1), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.asyncio
async def test_a_revoked_node_is_refused_by_every_node_and_seen_dead(cluster, fleet):
    c = await cluster(5)
    await wait_for(c.converged, 10.0, what="convergence")
    victim_creds = fleet.node_credentials("node-04")
    assert await ping_as(victim_creds, c.nodes["node-01"], "node-04") is not grpc.StatusCode.PERMISSION_DENIED
    others = [n for i, n in c.nodes.items() if i != "node-04"]

    started = time.monotonic()
    reply = await revoke(fleet, c.nodes["node-00"], "node-04")
    assert reply.added and reply.node_id == "node-04"
    took_s = await wait_for(lambda: all(n.trust.is_revoked_id("node-04") for n in others), 10.0,
                            what="every node enforces the revocation")
    bound_s = FAST_TIMINGS.dissemination_s(5) + 5.0  # gossip of the digest, then one fetch (rate limit 5 s)
    assert took_s <= bound_s, (took_s, bound_s)
    for node in others:
        assert node.membership.member("node-04").state is State.DEAD
        assert await ping_as(victim_creds, node, "node-04") is grpc.StatusCode.PERMISSION_DENIED
    print(f"revocation enforced by every node {took_s:.2f}s after submission (bound {bound_s:.1f}s)")
    # It persists: a restarted node still refuses the revoked certificate.
    survivor = c.nodes["node-03"]
    await c.stop("node-03")
    restarted = await c.add("node-03", seeds=[c.nodes["node-00"].address])
    assert restarted.trust.is_revoked_id("node-04")
    assert time.monotonic() - started < 60
    del survivor


@pytest.mark.asyncio
@pytest.mark.parametrize("which", ["leader", "follower"])
async def test_a_revoked_member_is_removed_from_its_site_group(cluster, fleet, which):
    """Revoking a member of a three-member site group takes it out of the group on the others (an
    audited ledger entry carrying the operator's revocation, then the Raft membership change), and
    the two left commit on their own: the revoked one no longer counts in their majority. A revoked
    leader is refused by the others, who elect one of their own first."""
    members = ["node-00", "node-01", "node-02"]
    c = await cluster(3, raft=RaftSection(members=members))
    await wait_for(c.converged, 10.0, what="convergence")
    leader = await c.nodes["node-00"].group.raft.wait_for_leader(10.0)
    victim = leader if which == "leader" else next(m for m in members if m != leader)
    left = [c.nodes[m] for m in members if m != victim]
    await revoke(fleet, left[0], victim)
    bound_s = FAST_TIMINGS.dissemination_s(3) + 5.0 + 10.0  # revocation spread, then election and two commits
    remaining = [m.config.node_id for m in left]
    took_s = await wait_for(lambda: all(n.group.raft.members() == remaining for n in left),
                            bound_s, what=f"{victim} removed from the group on the others")
    print(f"{victim} out of its site group {took_s:.2f}s after revocation (bound {bound_s:.1f}s)")
    def removals(node) -> list:
        return [r for r in node.group.audit_records() if r.kind == "member_removed"]

    # A follower takes the membership change in when the entry arrives (pysyncobj), and applies (and audits)
    # the ledger's removal entry before it only once it learns that entry is committed: wait for the record.
    await wait_for(lambda: all(removals(n) for n in left), 10.0,
                   what="the removal audited on both members left")
    for node in left:
        removed = removals(node)
        assert [r.payload["node_id"] for r in removed] == [victim], removed
        assert removed[0].payload["reason"] == "stolen from the berlin site"
    # Two members, no third: a commit still needs (and gets) both of them.
    result = await left[1].group.set_routes({"cam-1": left[0].config.node_id})
    assert result.outcome.value == "applied"
    # A member restarted from its journal keeps the removal (its config still names the revoked node).
    await c.stop(left[1].config.node_id)
    restarted = await c.add(left[1].config.node_id, seeds=[left[0].address])
    await wait_for(lambda: restarted.group.raft.members() == remaining, 20.0,
                   what="the restarted member replays the removal")


@pytest.mark.asyncio
async def test_a_revocation_not_signed_by_an_operator_is_refused(cluster, fleet):
    c = await cluster(2)
    node = c.nodes["node-00"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await revoke(fleet, node, "node-01", key_file="publisher.key", role=KeyRole.PUBLISHER)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "refused" in refused.value.details()
    assert not node.trust.is_revoked_id("node-01")
    # A node certificate cannot submit one at all.
    async with channel(fleet.node_credentials("node-01"), node) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await trust_pb2_grpc.TrustStub(ch).Revoke(trust_pb2.RevokeRequest(revocation_json=b"{}"),
                                                      timeout=5)
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED


def expired_credentials(fleet, name: str, directory) -> Credentials:
    """A node certificate from the fleet CA that expired yesterday."""
    ca_cert = x509.load_pem_x509_certificate((fleet.directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((fleet.directory / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "node")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in san_names(name, Role.NODE)]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (directory / "ca.pem").write_bytes((fleet.directory / "ca.pem").read_bytes())
    return Credentials(name, Role.NODE, directory / "cert.pem", directory / "key.pem", directory / "ca.pem")


@pytest.mark.asyncio
async def test_an_expired_certificate_is_refused(cluster, fleet, tmp_path):
    c = await cluster(1)
    node = c.nodes["node-00"]
    expired = expired_credentials(fleet, "node-09", tmp_path / "expired")
    code = await ping_as(expired, node, "node-09")
    # The TLS handshake or the check refuses it.
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED)
    code = await ping_as(fleet.node_credentials("node-08"), node, "node-08")
    assert code is not grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio
async def test_a_node_will_not_start_with_another_nodes_certificate_or_a_readable_key(fleet, tmp_path):
    c = LocalCluster(fleet, tmp_path, FAST_TIMINGS)
    config = c.config("node-00", site="berlin", seeds=[])
    wrong = config.model_copy(update={"tls": c.config("node-01", site="berlin", seeds=[]).tls})
    with pytest.raises(NodeStartError, match="node_id is 'node-00' but .* is the certificate of 'node-01'"):
        Node(wrong)
    key = fleet.node_credentials("node-02").key_path
    key.chmod(0o644)
    try:
        with pytest.raises(NodeStartError, match=f"chmod 600 {key}"):
            Node(c.config("node-02", site="berlin", seeds=[]))
    finally:
        key.chmod(0o600)


class _FileGadget:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.asyncio
async def test_a_pickle_gadget_on_every_decoding_path_runs_nowhere(cluster, fleet, tmp_path):
    """A member's certificate sends a pickle whose unpickling would create a file, in every field of
    every service a node decodes: membership (metadata too), transfer, decisions, trust, Raft, admin."""
    c = await cluster(2, raft=RaftSection(members=["node-00", "node-01"]))
    node = c.nodes["node-00"]
    await wait_for(c.converged, 10.0, what="convergence")
    await node.group.raft.wait_for_leader(10.0)
    marker = tmp_path / "pwned"
    gadget = pickle.dumps(_FileGadget(str(marker)))
    member = fleet.node_credentials("node-01")
    outcomes = []

    async def attempt(what, call):
        try:
            await call
            outcomes.append((what, "OK"))
        except grpc.aio.AioRpcError as exc:
            outcomes.append((what, exc.code().name))

    async with channel(member, node) as ch:
        update = membership_pb2.MemberUpdate(node_id="node-01", address="127.0.0.1:1", incarnation=99,
                                             state=0, meta_version=1, meta=gadget)
        membership = membership_pb2_grpc.MembershipStub(ch)
        await attempt("gossip metadata",
                      membership.Gossip(membership_pb2.Gossip(sender="node-01", updates=[update]), timeout=5))
        await attempt("membership raw bytes", ch.unary_unary("/mesh.v1.Membership/Ping")(gadget, timeout=5))
        transfer = transfer_pb2_grpc.TransferStub(ch)
        await attempt("transfer",
                      transfer.GetManifest(transfer_pb2.ManifestRequest(name="m", version="1"), timeout=5))
        await attempt("transfer raw bytes",
                      ch.unary_unary("/mesh.v1.Transfer/GetManifest")(gadget, timeout=5))
        await attempt("decisions raw bytes", ch.unary_unary("/mesh.v1.Decisions/Propose")(gadget, timeout=5))
        await attempt("trust",
                      trust_pb2_grpc.TrustStub(ch).Revoke(trust_pb2.RevokeRequest(revocation_json=gadget),
                                                          timeout=5))
        await attempt("admin raw bytes", ch.unary_unary("/mesh.v1.Admin/Status")(gadget, timeout=5))
        call = raft_pb2_grpc.RaftStub(ch).Exchange(metadata=((GROUP_KEY, node.group.group),))
        assert (await call.read()).node_id == "node-00"
        await call.write(raft_pb2.RaftBatch(frames=[gadget]))
        with pytest.raises(grpc.aio.AioRpcError) as raft_refused:
            await call.read()
        outcomes.append(("raft frame", raft_refused.value.code().name))
    async with channel(fleet.operator, node) as ch:
        await attempt("decisions propose", decisions_pb2_grpc.DecisionsStub(ch).Propose(
            decisions_pb2.ProposeRequest(decision_json=gadget.decode("latin1")), timeout=5))
        await attempt("trust revoke", trust_pb2_grpc.TrustStub(ch).Revoke(
            trust_pb2.RevokeRequest(revocation_json=gadget), timeout=5))
        await attempt("decisions approve", decisions_pb2_grpc.DecisionsStub(ch).Approve(
            decisions_pb2.AnswerRequest(approval_json=gadget.decode("latin1")), timeout=5))
    await asyncio.sleep(0.2)  # anything that would unpickle later (a background task) has had its turn
    assert not marker.exists(), outcomes
    assert dict(outcomes)["raft frame"] == "INVALID_ARGUMENT"
    # The node keeps serving: membership converges again (node-01 refutes the address the forged
    # update gave it), the group still commits.
    await wait_for(c.converged, 10.0, what="convergence after the forged metadata")
    result = await node.group.set_routes({"cam-1": "node-00"})
    assert result.outcome.value in ("applied", "noop"), outcomes
    print(json.dumps(dict(outcomes)))


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process `pid` listens on (from /proc: its socket inodes in LISTEN state)."""
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_node_with_a_raft_group_listens_only_with_tls_besides_its_probe_port(fleet, tmp_path):
    """No plaintext Raft port remains: every socket the node process listens on speaks only mTLS,
    except the metrics/probe port (plain HTTP by design; it serves no secret)."""
    import subprocess

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from mesh.node.local import free_ports, poll_until, spawn_node_process, write_node_config

    grpc_port, metrics_port = free_ports(2)
    creds = fleet.node_credentials("node-30")
    config = tmp_path / "node.toml"
    write_node_config(config, node_id="node-30", address=f"127.0.0.1:{grpc_port}", seeds=[], site="berlin",
                      tls_dir=creds.directory, data_dir=tmp_path / "data", timings=FAST_TIMINGS,
                      metrics_listen=f"127.0.0.1:{metrics_port}", raft={"members": ["node-30"]})
    process = spawn_node_process(config, tmp_path / "node.log")
    try:
        poll_until(lambda: {grpc_port, metrics_port} <= listening_ports(process.pid), 20.0,
                   "the node listens")
        ports = listening_ports(process.pid)
        assert ports == {grpc_port, metrics_port}, ports
        for port in ports - {metrics_port}:
            # No TLS: nothing answers.
            with grpc.insecure_channel(f"127.0.0.1:{port}") as plain, pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=2)
            with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(creds),
                                     options=secure_channel_options(Role.NODE, "node-30")) as tls:
                health = health_pb2_grpc.HealthStub(tls).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == 1
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.asyncio
async def test_a_node_warns_when_its_certificate_is_about_to_expire(fleet, tmp_path, caplog):
    from mesh.identity.ca import enroll
    from mesh.node.runtime import watch_certificate_expiry

    creds = enroll(fleet.directory, "node-31", out_dir=tmp_path / "short", validity_days=3)
    task = asyncio.create_task(watch_certificate_expiry(creds))
    await wait_for(lambda: any("expires in" in r.getMessage() for r in caplog.records), 5.0, what="a warning")
    task.cancel()
    message = next(r.getMessage() for r in caplog.records if "expires in" in r.getMessage())
    assert "mesh fleet renew node-31" in message and ("2.9 days" in message or "3.0 days" in message)
