"""Real nodes (grpc.aio, mTLS) in one process on loopback: convergence, partitions, auth."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest

from mesh._proto import admin_pb2, admin_pb2_grpc, membership_pb2, membership_pb2_grpc
from mesh.identity.tls import channel_credentials, secure_channel_options
from mesh.membership.messages import State
from mesh.node.local import FAST_TIMINGS, LocalFleet, wait_for

pytestmark = pytest.mark.asyncio


async def test_ten_nodes_in_three_sites_converge(cluster):
    c = await cluster(10, sites=3)
    # Joining is one push-pull with the seed, then gossip: a few gossip rounds.
    took = await wait_for(c.converged, 10.0, what="10-node convergence")
    views = c.views()
    for node_id, view in views.items():
        assert set(view) == set(c.nodes), node_id
    sites = {m.labels for m in c.nodes["node-00"].membership.members()}
    assert {dict(labels)["site"] for labels in sites} == {"amsterdam", "berlin", "chicago"}
    print(f"converged in {took:.2f}s")


async def test_graceful_leave_is_seen_as_left_not_dead(cluster):
    c = await cluster(6)
    await wait_for(c.converged, 10.0, what="convergence")
    await c.stop("node-03", leave=True)
    survivors = list(c.nodes)
    await wait_for(lambda: all(v["node-03"] is State.LEFT for v in c.views(survivors).values()),
                   FAST_TIMINGS.dissemination_s(6) * 4, what="everyone sees node-03 left")
    assert not any(e.node_id == "node-03" and e.kind.value == "dead"
                   for n in c.nodes.values() for e in n.events)


async def test_partition_heals_and_views_reconverge(cluster):
    c = await cluster(10, sites=2)
    await wait_for(c.converged, 10.0, what="convergence")
    ids = sorted(c.nodes)
    side_a, side_b = ids[:5], ids[5:]

    def cut(one, other):
        for node_id in one:
            node = c.nodes[node_id]
            node.faults.blocked |= set(other) | {c.nodes[o].address for o in other}

    cut(side_a, side_b)
    cut(side_b, side_a)
    bound = FAST_TIMINGS.detection_bound_s(10)

    def split_brain() -> bool:
        views = c.views()
        return all(views[a][b] is State.DEAD for a in side_a for b in side_b) and \
            all(views[b][a] is State.DEAD for a in side_a for b in side_b)

    await wait_for(split_brain, 3 * bound, what="each side marks the other dead")
    assert c.converged(side_a) and c.converged(side_b)

    for node in c.nodes.values():
        node.faults.blocked.clear()
    # Push-pull reaches one dead member per interval; the refuted ALIVE then gossips.
    heal_bound = 3 * FAST_TIMINGS.push_pull_interval_s + FAST_TIMINGS.dissemination_s(10) + 5
    took = await wait_for(c.converged, heal_bound, what="views reconverge after the partition heals")
    print(f"reconverged {took:.2f}s after healing (bound {heal_bound:.1f}s)")


async def test_node_cannot_speak_for_another(cluster, fleet):
    c = await cluster(2)
    await wait_for(c.converged, 10.0, what="convergence")
    target = c.nodes["node-01"]
    creds = fleet.node_credentials("node-00")
    async with grpc.aio.secure_channel(target.address, channel_credentials(creds),
                                       options=secure_channel_options(peer_id="node-01")) as ch:
        stub = membership_pb2_grpc.MembershipStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Ping(membership_pb2.Ping(sender="node-07", target="node-01", seq=1), timeout=5)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
        # A node certificate does not open the admin service.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=5)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
        # And the real sender is answered.
        ack = await stub.Ping(membership_pb2.Ping(sender="node-00", target="node-01", seq=1), timeout=5)
        assert ack.sender == "node-01"


async def test_operator_certificate_cannot_gossip(cluster, fleet):
    c = await cluster(1)
    node = c.nodes["node-00"]
    async with grpc.aio.secure_channel(node.address, channel_credentials(fleet.operator),
                                       options=secure_channel_options()) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await membership_pb2_grpc.MembershipStub(ch).Gossip(membership_pb2.Gossip(sender="admin"),
                                                                timeout=5)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
        status = await admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=5)
        assert status.node_id == "node-00"


async def test_clients_without_a_fleet_certificate_are_refused(cluster, tmp_path):
    c = await cluster(1)
    node = c.nodes["node-00"]
    ca_pem = c.fleet.fleet.ca_cert_path.read_bytes()
    other_fleet = LocalFleet(tmp_path / "other-fleet")
    attempts = {
        "no client certificate": grpc.ssl_channel_credentials(root_certificates=ca_pem),
        "certificate from another fleet's CA": grpc.ssl_channel_credentials(
            root_certificates=ca_pem,
            private_key=other_fleet.node_credentials("node-00").key_path.read_bytes(),
            certificate_chain=other_fleet.node_credentials("node-00").cert_path.read_bytes()),
    }
    for what, creds in attempts.items():
        async with grpc.aio.secure_channel(node.address, creds, options=secure_channel_options()) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await membership_pb2_grpc.MembershipStub(ch).Ping(
                    membership_pb2.Ping(sender="node-00", target="node-00", seq=1), timeout=5)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE, what
    # The node is still serving its own fleet.
    assert node.membership.member("node-00").state is State.ALIVE


class _BlockTheLoopOn(logging.Handler):
    """Blocks the event loop for `block_s` when a record containing `text` is logged:
    a node busy with something else while a request is being handled."""

    def __init__(self, text: str, block_s: float) -> None:
        super().__init__(logging.INFO)
        self.text, self.block_s = text, block_s

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            time.sleep(self.block_s)


async def test_a_reply_to_a_caller_that_gave_up_is_dropped_without_an_error_log(cluster, fleet, caplog):
    """The node finishes a request after the caller's deadline: it must not send the
    reply (gRPC logs an ExecuteBatchError traceback when that send fails) nor log an error."""
    c = await cluster(2)
    await wait_for(c.converged, 10.0, what="convergence")
    target = c.nodes["node-01"]
    creds = channel_credentials(fleet.node_credentials("node-00"))
    outcome: list[grpc.StatusCode] = []
    # The ping carries news of a member: handling it logs "member slowpoke joined",
    # and the loop is blocked right there, past the caller's deadline.
    news = membership_pb2.MemberUpdate(node_id="slowpoke", address="127.0.0.1:9", incarnation=1)

    def impatient_caller() -> None:
        options = secure_channel_options(peer_id="node-01")
        with grpc.secure_channel(target.address, creds, options=options) as ch:
            stub = membership_pb2_grpc.MembershipStub(ch)
            stub.Ping(membership_pb2.Ping(sender="node-00", target="node-01", seq=1), timeout=5)  # handshake
            try:
                stub.Ping(membership_pb2.Ping(sender="node-00", target="node-01", seq=2, updates=[news]),
                          timeout=0.2)
                outcome.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                outcome.append(exc.code())

    blocker = _BlockTheLoopOn("member slowpoke joined", 0.5)
    membership_log = logging.getLogger("mesh.membership")
    membership_log.addHandler(blocker)
    caplog.set_level(logging.INFO)
    dropped = target.runner.counters.replies_dropped
    try:
        await asyncio.to_thread(impatient_caller)
    finally:
        membership_log.removeHandler(blocker)
    assert outcome == [grpc.StatusCode.DEADLINE_EXCEEDED]
    assert target.runner.counters.replies_dropped >= dropped + 1  # others may drop while blocked
    await asyncio.sleep(0.2)   # let gRPC finish the call on its side
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
