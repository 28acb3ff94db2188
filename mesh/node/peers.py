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


class PeerBlocked(ConnectionRefusedError):
    """Raised instead of dialing a peer that fault injection has cut off."""


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
        self._observe(method.decode() if isinstance(method, bytes) else method, time.perf_counter() - start, code)
        return call


class PeerChannels:
    """Cache of mTLS channels to fleet nodes, verifying each peer's node id."""

    def __init__(self, credentials: Credentials, faults: Faults | None = None, *, max_channels: int = 256,
                 observe: Callable[[str, float, grpc.StatusCode], None] | None = None) -> None:
        self._credentials = channel_credentials(credentials)
        self._faults = faults or Faults()
        self._max_channels = max_channels
        self._channels: OrderedDict[tuple[str, str | None], grpc.aio.Channel] = OrderedDict()
        self._interceptors = [_Timing(observe)] if observe else []
        self._closing: set[asyncio.Task] = set()

    def channel(self, address: str, peer_id: str | None) -> grpc.aio.Channel:
        if self._faults.is_blocked(address, peer_id):
            raise PeerBlocked(f"{peer_id or address} is cut off by fault injection")
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
