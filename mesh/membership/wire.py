"""Protobuf <-> core message conversion, with validation of everything a peer sends.

A peer is authenticated (mTLS) but not trusted to be bug-free: every field is
checked here before the core sees it, and a message with any bad field is
rejected whole with `WireError`, which the servicer turns into
INVALID_ARGUMENT.
"""

from __future__ import annotations

import re
from typing import cast

from mesh._proto import membership_pb2 as pb
from mesh.membership.core import MAX_META_BYTES, MAX_UPDATES_PER_MESSAGE
from mesh.membership.messages import Ack, Gossip, Nack, Ping, PingReq, PushPull, State, Update, Updates

MAX_LABELS = 32
MAX_INCARNATION = (1 << 63) - 1
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):\d{1,5}$")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
_POOL = re.compile(r"^([a-z][a-z0-9_.-]{0,62})?$")


class WireError(ValueError):
    """A message from a peer failed validation; the text says which field and why."""


def check_node_id(value: str, field: str) -> str:
    if not _NODE_ID.match(value):
        raise WireError(f"{field}: {value[:80]!r} is not a node id (1-63 of [A-Za-z0-9._-])")
    return value


def check_address(value: str, field: str) -> str:
    if not _ADDRESS.match(value) or int(value.rsplit(":", 1)[1]) > 65535:
        raise WireError(f"{field}: {value[:80]!r} is not host:port")
    return value


def check_pool(value: str, field: str = "pool") -> str:
    if not _POOL.match(value):
        raise WireError(f"{field}: {value[:80]!r} is not a pool name (empty, or 1-63 of [a-z0-9_.-])")
    return value


def _optional_node_id(value: str, field: str) -> str:
    return check_node_id(value, field) if value else value


def _update_from_pb(m: pb.MemberUpdate, field: str) -> Update:
    check_node_id(m.node_id, f"{field}.node_id")
    check_address(m.address, f"{field}.address")
    if m.incarnation > MAX_INCARNATION:
        raise WireError(f"{field}.incarnation: {m.incarnation} is out of range")
    if m.state not in State._value2member_map_:
        raise WireError(f"{field}.state: unknown member state {m.state}")
    if len(m.labels) > MAX_LABELS:
        raise WireError(f"{field}.labels: {len(m.labels)} labels, at most {MAX_LABELS}")
    for key, value in m.labels.items():
        if not _LABEL_KEY.match(key) or len(value) > 255:
            raise WireError(f"{field}.labels: bad label {key[:64]!r}")
    if m.meta_version > MAX_INCARNATION:
        raise WireError(f"{field}.meta_version: {m.meta_version} is out of range")
    if len(m.meta) > MAX_META_BYTES:
        raise WireError(f"{field}.meta: {len(m.meta)} bytes, at most {MAX_META_BYTES}")
    return Update(m.node_id, m.address, m.incarnation, State(m.state), tuple(sorted(m.labels.items())),
                  m.meta_version, bytes(m.meta), _optional_node_id(m.accuser, f"{field}.accuser"))


def _updates_from_pb(items, field: str) -> Updates:
    if len(items) > MAX_UPDATES_PER_MESSAGE:
        raise WireError(f"{field}: {len(items)} entries, at most {MAX_UPDATES_PER_MESSAGE}")
    return tuple(_update_from_pb(m, f"{field}[{i}]") for i, m in enumerate(items))


def _updates_to_pb(updates: Updates) -> list[pb.MemberUpdate]:
    return [pb.MemberUpdate(node_id=u.node_id, address=u.address, incarnation=u.incarnation,
                            # The enum's number: the stub names only pb.MemberState, protobuf takes either.
                            state=cast(pb.MemberState, int(u.state)), labels=dict(u.labels),
                            meta_version=u.meta_version,
                            meta=u.meta, accuser=u.accuser) for u in updates]


def ping_from_pb(m: pb.Ping) -> Ping:
    return Ping(check_node_id(m.sender, "sender"), check_node_id(m.target, "target"), m.seq,
                _updates_from_pb(m.updates, "updates"), check_pool(m.pool))


def ping_to_pb(p: Ping) -> pb.Ping:
    return pb.Ping(sender=p.sender, target=p.target, seq=p.seq, updates=_updates_to_pb(p.updates),
                   pool=p.pool)


def ack_from_pb(m: pb.Ack) -> Ack | Nack:
    """An Ack, or a relay's Nack (an Ack with `nack` set)."""
    kind = Nack if m.nack else Ack
    return kind(check_node_id(m.sender, "sender"), m.seq, _updates_from_pb(m.updates, "updates"))


def ack_to_pb(a: Ack | Nack) -> pb.Ack:
    return pb.Ack(sender=a.sender, seq=a.seq, updates=_updates_to_pb(a.updates), nack=isinstance(a, Nack))


def ping_req_from_pb(m: pb.PingReq) -> PingReq:
    return PingReq(check_node_id(m.sender, "sender"), check_node_id(m.target, "target"),
                   check_address(m.target_address, "target_address"), m.seq,
                   _updates_from_pb(m.updates, "updates"), check_pool(m.pool))


def ping_req_to_pb(r: PingReq) -> pb.PingReq:
    return pb.PingReq(sender=r.sender, target=r.target, target_address=r.target_address, seq=r.seq,
                      updates=_updates_to_pb(r.updates), pool=r.pool)


def gossip_from_pb(m: pb.Gossip) -> Gossip:
    return Gossip(check_node_id(m.sender, "sender"), _updates_from_pb(m.updates, "updates"),
                  check_pool(m.pool))


def gossip_to_pb(g: Gossip) -> pb.Gossip:
    return pb.Gossip(sender=g.sender, updates=_updates_to_pb(g.updates), pool=g.pool)


def push_pull_from_pb(m: pb.PushPull) -> PushPull:
    return PushPull(check_node_id(m.sender, "sender"), _updates_from_pb(m.members, "members"),
                    check_pool(m.pool),
                    _optional_node_id(m.page_after, "page_after"), _optional_node_id(m.page_end, "page_end"))


def push_pull_to_pb(p: PushPull) -> pb.PushPull:
    return pb.PushPull(sender=p.sender, members=_updates_to_pb(p.members), pool=p.pool,
                       page_after=p.page_after,
                       page_end=p.page_end)
