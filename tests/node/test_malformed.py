"""Malformed input on every RPC gets an error status, and the node keeps serving.

The node under attack is a real `mesh node` process; the attacker holds a
valid fleet node certificate (the worst case: an authenticated but buggy or
hostile peer).
"""

from __future__ import annotations

import signal

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh._proto import admin_pb2, admin_pb2_grpc, membership_pb2_grpc
from mesh._proto import membership_pb2 as pb
from mesh.identity.tls import channel_credentials, secure_channel_options
from mesh.membership import wire
from mesh.node.local import FAST_TIMINGS, free_ports, spawn_node_process, write_node_config

NODE_ID = "fuzz-target"
ATTACKER = "fuzz-attacker"
METHODS = {
    "Ping": (pb.Ping, wire.ping_from_pb),
    "PingReq": (pb.PingReq, wire.ping_req_from_pb),
    "Gossip": (pb.Gossip, wire.gossip_from_pb),
    "PushPull": (pb.PushPull, wire.push_pull_from_pb),
}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def node_channel(fleet, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz")
    port, = free_ports(1)
    address = f"127.0.0.1:{port}"
    config = workdir / "node.toml"
    write_node_config(config, node_id=NODE_ID, address=address, seeds=[], site="fuzz",
                      tls_dir=fleet.node_credentials(NODE_ID).directory, data_dir=workdir / "data",
                      timings=FAST_TIMINGS)
    proc = spawn_node_process(config, workdir / "node.log")
    channel = grpc.secure_channel(address, channel_credentials(fleet.node_credentials(ATTACKER)),
                                  options=secure_channel_options(peer_id=NODE_ID) + [
                                      ("grpc.max_send_message_length", 64 << 20)])
    grpc.channel_ready_future(channel).result(timeout=20)
    channel.address = address
    yield channel
    channel.close()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=15)
    log = (workdir / "node.log").read_text()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def raw_call(channel, method: str, payload: bytes):
    call = channel.unary_unary(f"/mesh.v1.Membership/{method}", request_serializer=None,
                               response_deserializer=None)
    return call(payload, timeout=5)


def still_serving(channel) -> None:
    ack = membership_pb2_grpc.MembershipStub(channel).Ping(pb.Ping(sender=ATTACKER, target=NODE_ID, seq=1),
                                                           timeout=5)
    assert ack.sender == NODE_ID


def expected_code(method: str, payload: bytes) -> grpc.StatusCode | None:
    """INVALID_ARGUMENT unless the bytes happen to decode to a message our validation accepts."""
    message_type, parse = METHODS[method]
    try:
        parse(message_type.FromString(payload))
    except Exception:
        return grpc.StatusCode.INVALID_ARGUMENT
    return None


@FUZZ
@given(method=st.sampled_from(sorted(METHODS)), payload=st.binary(max_size=2048))
def test_garbage_bytes_are_invalid_argument(node_channel, method, payload):
    want = expected_code(method, payload)
    try:
        raw_call(node_channel, method, payload)
        got = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        got = exc.code()
    if want is not None:
        assert got is want, (method, payload)
    else:  # valid by accident: only identity or target checks may refuse it
        assert got in (grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)


# Values of the right protobuf type but the wrong shape.
ids = st.one_of(st.text(max_size=80), st.sampled_from(["", " ", "a" * 64, "../etc", NODE_ID, ATTACKER]))
addresses = st.one_of(st.text(max_size=40), st.sampled_from(["", "host", "1.2.3.4:99999", "[::1]:7", "h:1"]))
updates = st.builds(pb.MemberUpdate, node_id=ids, address=addresses,
                    incarnation=st.integers(0, 2**64 - 1), state=st.integers(0, 7),
                    labels=st.dictionaries(st.text(max_size=70), st.text(max_size=300), max_size=40))


@FUZZ
@given(method=st.sampled_from(sorted(METHODS)), sender=ids, target_id=ids, address=addresses,
       items=st.lists(updates, max_size=5))
def test_wrong_values_get_a_status_never_a_crash(node_channel, method, sender, target_id, address, items):
    message = {
        "Ping": lambda: pb.Ping(sender=sender, target=target_id, seq=1, updates=items),
        "PingReq": lambda: pb.PingReq(sender=sender, target=target_id, target_address=address, seq=1,
                                      updates=items),
        "Gossip": lambda: pb.Gossip(sender=sender, updates=items),
        "PushPull": lambda: pb.PushPull(sender=sender, members=items),
    }[method]()
    payload = message.SerializeToString()
    want = expected_code(method, payload)
    try:
        raw_call(node_channel, method, payload)
        got = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        got = exc.code()
    if want is not None:
        assert got is want
    elif sender != ATTACKER:
        assert got is grpc.StatusCode.PERMISSION_DENIED
    else:
        assert got in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)


def test_wrong_wire_types_are_invalid_argument(node_channel):
    # Field 1 (sender, a string) sent as a varint; field 3 (seq) as a length-delimited blob.
    for payload in (b"\x08\x96\x01", b"\x1a\x03abc", b"\x0a\xff\xff\xff\xff\x0f"):
        with pytest.raises(grpc.RpcError) as err:
            raw_call(node_channel, "Ping", payload)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    still_serving(node_channel)


def test_oversize_message_is_resource_exhausted(node_channel):
    huge = pb.Gossip(sender=ATTACKER, updates=[pb.MemberUpdate(node_id="x", address="h:1",
                                                               labels={"k": "v" * 200})] * 30000)
    assert huge.ByteSize() > 4 * 1024 * 1024
    with pytest.raises(grpc.RpcError) as err:
        membership_pb2_grpc.MembershipStub(node_channel).Gossip(huge, timeout=10)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serving(node_channel)


def test_too_many_updates_within_size_limit_is_invalid_argument(node_channel):
    many = pb.PushPull(sender=ATTACKER, members=[pb.MemberUpdate(node_id=f"n{i}", address="h:1")
                                                 for i in range(wire.MAX_UPDATES_PER_MESSAGE + 1)])
    with pytest.raises(grpc.RpcError) as err:
        membership_pb2_grpc.MembershipStub(node_channel).PushPull(many, timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "at most" in err.value.details()


def test_unknown_node_ids_are_not_found(node_channel):
    stub = membership_pb2_grpc.MembershipStub(node_channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Ping(pb.Ping(sender=ATTACKER, target="somebody-else", seq=1), timeout=5)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.PingReq(pb.PingReq(sender=ATTACKER, target="never-heard-of", target_address="127.0.0.1:1",
                                seq=1),
                     timeout=5)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    still_serving(node_channel)


def test_node_still_serves_operators_after_the_fuzzing(node_channel, fleet):
    still_serving(node_channel)
    with grpc.secure_channel(node_channel.address, channel_credentials(fleet.operator),
                             options=secure_channel_options(peer_id=NODE_ID)) as ch:
        status = admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=5)
    assert status.node_id == NODE_ID
