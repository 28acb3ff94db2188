"""Outgoing mTLS channels to peers, and transport-level fault injection.

One channel per (address, expected peer id), kept in a bounded LRU so a node
that has probed a large fleet does not hold a connection to every device.
`Faults` lets tests (and chaos runs without network namespaces) cut a node
off from chosen peers in both directions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import grpc

from mesh.identity.ca import Credentials, Role
from mesh.identity.tls import channel_credentials, secure_channel_options
from mesh.inference.tensors import MAX_MESSAGE_BYTES  # one setting with the Infer request limits

log = logging.getLogger("mesh.node.peers")

# Keepalive on every node-to-node connection (issue: a connection that died in a partition held
# unacknowledged data for minutes, TCP's retransmission back-off, and its peer was declared dead
# after the network had healed). memberlist's LAN defaults probe every 1 s with a 0.5 s timeout;
# gRPC's HTTP/2 pings with these settings notice a dead connection in about 2 s (ping after 1 s
# of silence, 1 s to answer), well within a suspicion timeout, and gRPC then reconnects.
KEEPALIVE_TIME_MS = 1000
KEEPALIVE_TIMEOUT_MS = 1000
# A connection attempt is given this long before a fresh one (a new SYN) is made; gRPC's default
# is 20 s, which left members of a healed partition waiting on the kernel's SYN back-off.
CONNECT_TIMEOUT_MS = 1000

CLIENT_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
]
# What a node's server accepts and does itself: clients may ping every KEEPALIVE_TIME_MS even
# without calls in flight (gRPC's default minimum is 5 minutes, and it closes connections that ping
# more often with "too_many_pings"); the server pings idle clients too, so a server-side stream
# (a peer's Raft stream) from a vanished peer is closed as quickly.
SERVER_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
]


class PeerBlocked(ConnectionRefusedError):
    """Raised instead of dialing a peer that fault injection has cut off."""


class PeerRefused(ConnectionRefusedError):
    """Raised instead of dialing a peer this node no longer trusts (revoked)."""


class Faults:
    """Peers (by node id or address) this node pretends it cannot reach, both ways."""

    def __init__(self) -> None:
        self.blocked: set[str] = set()

    def is_blocked(self, *names: str | None) -> bool:
        return any(name in self.blocked for name in names if name)


class _Timing(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, observe: Callable[[str, float, grpc.StatusCode], None]) -> None:
        self._observe = observe

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        start = time.perf_counter()
        call = await continuation(client_call_details, request)
        try:
            await call
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        method = client_call_details.method
        self._observe(method.decode() if isinstance(method, bytes) else method,
                      time.perf_counter() - start, code)
        return call


class PeerChannels:
    """Cache of mTLS channels to fleet nodes, verifying each peer's node id."""

    def __init__(self, credentials: Credentials, faults: Faults | None = None, *, max_channels: int = 256,
                 observe: Callable[[str, float, grpc.StatusCode], None] | None = None,
                 refuse: Callable[[str], bool] = lambda peer_id: False) -> None:
        """`refuse(peer_id)`: True for peers this node must not dial (their certificate is revoked)."""
        self._credentials = channel_credentials(credentials)
        self._faults = faults or Faults()
        self._refuse = refuse
        self._max_channels = max_channels
        self._channels: OrderedDict[tuple[str, str | None], grpc.aio.Channel] = OrderedDict()
        self._interceptors = [_Timing(observe)] if observe else []
        self._closing: set[asyncio.Task] = set()

    def channel(self, address: str, peer_id: str | None) -> grpc.aio.Channel:
        if self._faults.is_blocked(address, peer_id):
            raise PeerBlocked(f"{peer_id or address} is cut off by fault injection")
        if peer_id is not None and self._refuse(peer_id):
            raise PeerRefused(f"{peer_id}'s certificate is revoked: not dialling it")
        key = (address, peer_id)
        channel = self._channels.get(key)
        if channel is not None:
            self._channels.move_to_end(key)
            return channel
        options = secure_channel_options(Role.NODE, peer_id) + [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # A peer that restarts should be reachable again at once, not after
            # gRPC's default reconnect backoff of up to two minutes.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            *CLIENT_KEEPALIVE_OPTIONS,
        ]
        channel = grpc.aio.secure_channel(address, self._credentials, options=options,
                                          interceptors=self._interceptors)
        self._channels[key] = channel
        while len(self._channels) > self._max_channels:
            _, old = self._channels.popitem(last=False)
            task = asyncio.ensure_future(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), OrderedDict()
        await asyncio.gather(*(c.close() for c in channels), *self._closing, return_exceptions=True)
