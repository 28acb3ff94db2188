"""Protobuf <-> core messages for the fields Lifeguard, pages and pools added: round
trips, and validation of what a peer sends (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh._proto import membership_pb2 as pb
from mesh.membership import wire
from mesh.membership.messages import Ack, Gossip, Nack, Ping, PingReq, PushPull, State, Update

node_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")
pools = st.sampled_from(["", "federation", "site.eu-1"])
updates = st.builds(Update, node_id=node_ids, address=st.just("10.0.0.1:7946"), incarnation=st.integers(0, 9),
                    state=st.sampled_from(State), labels=st.just((("site", "s1"),)),
                    meta_version=st.integers(0, 9), meta=st.binary(max_size=8),
                    accuser=st.one_of(st.just(""), node_ids))
update_lists = st.lists(updates, max_size=4).map(tuple)
messages = st.one_of(
    st.builds(Ping, node_ids, node_ids, st.integers(0, 99), update_lists, pools),
    st.builds(Ack, node_ids, st.integers(0, 99), update_lists),
    st.builds(Nack, node_ids, st.integers(0, 99), update_lists),
    st.builds(PingReq, node_ids, node_ids, st.just("10.0.0.2:7946"), st.integers(0, 99), update_lists, pools),
    st.builds(Gossip, node_ids, update_lists, pools),
    st.builds(PushPull, node_ids, update_lists, pools, st.one_of(st.just(""), node_ids),
              st.one_of(st.just(""), node_ids)),
)
CODECS = {
    Ping: (wire.ping_to_pb, wire.ping_from_pb), Ack: (wire.ack_to_pb, wire.ack_from_pb),
    Nack: (wire.ack_to_pb, wire.ack_from_pb), PingReq: (wire.ping_req_to_pb, wire.ping_req_from_pb),
    Gossip: (wire.gossip_to_pb, wire.gossip_from_pb),
    PushPull: (wire.push_pull_to_pb, wire.push_pull_from_pb),
}


@settings(max_examples=300, deadline=None)
@given(message=messages)
def test_every_message_survives_the_wire(message) -> None:
    to_pb, from_pb = CODECS[type(message)]
    encoded = to_pb(message)
    decoded = from_pb(type(encoded).FromString(encoded.SerializeToString()))
    assert decoded == message


def test_a_nack_is_an_ack_with_the_flag_that_older_requesters_ignore() -> None:
    encoded = wire.ack_to_pb(Nack("relay", 7))
    assert encoded.nack and encoded.sender == "relay"
    assert isinstance(wire.ack_from_pb(pb.Ack(sender="target", seq=7)), Ack)


@settings(max_examples=200, deadline=None)
@given(bad=st.text(max_size=70).filter(lambda s: not wire._POOL.match(s)))
def test_bad_pool_names_are_refused(bad: str) -> None:
    for request, parse in ((pb.Ping(sender="a", target="b", pool=bad), wire.ping_from_pb),
                           (pb.Gossip(sender="a", pool=bad), wire.gossip_from_pb),
                           (pb.PushPull(sender="a", pool=bad), wire.push_pull_from_pb),
                           (pb.PingReq(sender="a", target="b", target_address="h:1", pool=bad),
                            wire.ping_req_from_pb)):
        with pytest.raises(wire.WireError, match="pool"):
            parse(request)


@settings(max_examples=200, deadline=None)
@given(bad=st.text(min_size=1, max_size=70).filter(lambda s: not wire._NODE_ID.match(s)))
def test_bad_accusers_and_page_bounds_are_refused(bad: str) -> None:
    update = pb.MemberUpdate(node_id="x", address="h:1", state=1, accuser=bad)
    with pytest.raises(wire.WireError, match="accuser"):
        wire.gossip_from_pb(pb.Gossip(sender="a", updates=[update]))
    for field in ("page_after", "page_end"):
        with pytest.raises(wire.WireError, match=field):
            wire.push_pull_from_pb(pb.PushPull(sender="a", **{field: bad}))
