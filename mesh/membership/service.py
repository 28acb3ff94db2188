"""gRPC adapter for the SWIM core: a servicer for incoming calls and a loop that
runs the core's timers and delivers what it wants sent.

All protocol decisions are in `core.Membership`; this module only moves
messages, maps errors to gRPC statuses and keeps the clock. Everything runs on
one asyncio loop, so the core is never entered concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from mesh._proto import membership_pb2 as pb
from mesh._proto import membership_pb2_grpc as pb_grpc
from mesh.identity.ca import Role
from mesh.identity.tls import peer_identity
from mesh.membership import wire
from mesh.membership.core import Membership
from mesh.membership.messages import (
    EventKind,
    Gossip,
    MemberEvent,
    Ping,
    PingReq,
    PushPull,
    Send,
    UnknownMember,
    WrongTarget,
)

log = logging.getLogger("mesh.membership")

Dial = Callable[[str, "str | None"], pb_grpc.MembershipStub]
"""(address, expected node id or None) -> stub over an mTLS channel to that peer."""


@dataclass
class TrafficCounters:
    """Bytes of membership messages and client-call outcomes, read by the metrics exporter."""

    bytes_in: int = 0
    bytes_out: int = 0
    # Push-pull carries the whole member list (O(n) bytes per exchange); it is
    # counted apart so SWIM's own per-node load, which should not grow with n,
    # can be seen on its own.
    push_pull_bytes_out: int = 0
    calls_failed: int = 0


async def _authenticated_sender(context: grpc.aio.ServicerContext, sender: str) -> None:
    """The message's `sender` must be the node named in the caller's certificate:
    a node may speak only for itself."""
    peer = peer_identity(context)
    if peer is None or peer.role is not Role.NODE:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "membership calls need a fleet node certificate")
    if peer.name != sender:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"message claims sender {sender!r} but the caller's certificate is for {peer.name!r}")


class MembershipServicer(pb_grpc.MembershipServicer):
    def __init__(self, runner: "SwimRunner") -> None:
        self._runner = runner

    async def _parse(self, context, parse, request):
        try:
            return parse(request)
        except wire.WireError as exc:
            log.warning("rejected malformed %s from %s: %s", type(request).__name__, context.peer(), exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Ping(self, request: pb.Ping, context) -> pb.Ack:
        ping = await self._parse(context, wire.ping_from_pb, request)
        await _authenticated_sender(context, ping.sender)
        self._runner.counters.bytes_in += request.ByteSize()
        try:
            ack = self._runner.core.on_ping(ping, self._runner.now())
        except WrongTarget as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        self._runner.poke()
        return self._runner.outgoing(wire.ack_to_pb(ack))

    async def PingReq(self, request: pb.PingReq, context) -> pb.Ack:
        req = await self._parse(context, wire.ping_req_from_pb, request)
        await _authenticated_sender(context, req.sender)
        self._runner.counters.bytes_in += request.ByteSize()
        try:
            ping = self._runner.core.on_ping_req(req, self._runner.now())
        except UnknownMember as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        ack = await self._runner.probe_for(req, ping)
        self._runner.poke()
        if ack is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{req.target} did not answer the relayed ping")
        return self._runner.outgoing(wire.ack_to_pb(ack))

    async def Gossip(self, request: pb.Gossip, context) -> pb.Gossip:
        gossip = await self._parse(context, wire.gossip_from_pb, request)
        await _authenticated_sender(context, gossip.sender)
        self._runner.counters.bytes_in += request.ByteSize()
        reply = self._runner.core.on_gossip(gossip, self._runner.now())
        self._runner.poke()
        return self._runner.outgoing(wire.gossip_to_pb(reply))

    async def PushPull(self, request: pb.PushPull, context) -> pb.PushPull:
        pp = await self._parse(context, wire.push_pull_from_pb, request)
        await _authenticated_sender(context, pp.sender)
        self._runner.counters.bytes_in += request.ByteSize()
        reply = self._runner.core.on_push_pull(pp, self._runner.now())
        self._runner.poke()
        return self._runner.outgoing(wire.push_pull_to_pb(reply))


class SwimRunner:
    """Drives one `Membership` core on the running asyncio loop.

    The core says when it next needs `tick`; the runner sleeps until then or
    until an incoming message may have moved that deadline (`poke`). Each
    `Send` becomes one unary call whose reply is fed back to the core.
    """

    def __init__(self, core: Membership, dial: Dial, *, push_pull_timeout_s: float = 5.0,
                 on_events: Callable[[list[MemberEvent]], None] | None = None) -> None:
        self.core = core
        self.counters = TrafficCounters()
        self._dial = dial
        self._config = core.config
        self._push_pull_timeout_s = push_pull_timeout_s
        self._on_events = on_events
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self.now = asyncio.get_running_loop().time

    # -- lifecycle -------------------------------------------------------

    def start(self, seeds: list[str]) -> None:
        self._send_all(self.core.join(seeds, self.now()))
        self._loop_task = asyncio.create_task(self._run(), name=f"swim-{self.core.node_id}")

    async def leave(self, timeout_s: float = 2.0) -> None:
        """Tell peers we are leaving and wait (bounded) until they have heard it."""
        sends = self.core.leave(self.now())
        calls = [self._deliver(s) for s in sends]
        if calls:
            await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout_s)

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def poke(self) -> None:
        """An incoming message was handled: the core's next deadline may have moved."""
        self._wake.set()
        self._publish_events()

    # -- the loop ---------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._send_all(self.core.tick(self.now()))
            self._publish_events()
            delay = self.core.next_deadline() - self.now()
            if delay <= 0:
                continue
            self._wake.clear()
            # asyncio.timeout, not wait_for: 3.11's wait_for runs the wait in a
            # second task and can lose a cancel that races with the wake-up,
            # which left stop() waiting forever on a loop that never ended.
            try:
                async with asyncio.timeout(None if math.isinf(delay) else delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _publish_events(self) -> None:
        events = self.core.drain_events()
        if not events:
            return
        for event in events:
            # META changes with every chunk a peer stores: too chatty for info.
            level = logging.DEBUG if event.kind is EventKind.META else logging.INFO
            log.log(level, "member %s %s (incarnation %d)", event.node_id, event.kind.value, event.incarnation)
        if self._on_events:
            self._on_events(events)

    def _send_all(self, sends: list[Send]) -> None:
        for send in sends:
            task = asyncio.create_task(self._deliver(send))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def outgoing(self, message):
        size = message.ByteSize()
        self.counters.bytes_out += size
        if isinstance(message, pb.PushPull):
            self.counters.push_pull_bytes_out += size
        return message

    async def _deliver(self, send: Send) -> None:
        msg = send.message
        config = self._config
        try:
            stub = self._dial(send.address, send.target_id)
            if isinstance(msg, Ping):
                reply = await stub.Ping(self.outgoing(wire.ping_to_pb(msg)), timeout=config.probe_timeout_s)
                self.counters.bytes_in += reply.ByteSize()
                self.core.on_ack(wire.ack_from_pb(reply), self.now())
            elif isinstance(msg, PingReq):
                budget = config.probe_interval_s - config.probe_timeout_s
                reply = await stub.PingReq(self.outgoing(wire.ping_req_to_pb(msg)), timeout=budget)
                self.counters.bytes_in += reply.ByteSize()
                self.core.on_ack(wire.ack_from_pb(reply), self.now())
            elif isinstance(msg, Gossip):
                reply = await stub.Gossip(self.outgoing(wire.gossip_to_pb(msg)), timeout=config.probe_interval_s)
                self.counters.bytes_in += reply.ByteSize()
                self.core.on_gossip_reply(wire.gossip_from_pb(reply), self.now())
            elif isinstance(msg, PushPull):
                reply = await stub.PushPull(self.outgoing(wire.push_pull_to_pb(msg)),
                                            timeout=self._push_pull_timeout_s)
                self.counters.bytes_in += reply.ByteSize()
                self.core.on_push_pull_reply(wire.push_pull_from_pb(reply), self.now())
            else:  # pragma: no cover - the core only emits the four requests above
                raise TypeError(f"core asked to send {type(msg).__name__}")
        except (grpc.aio.AioRpcError, OSError) as exc:
            # OSError: the adapter refused to dial (fault injection, bad address).
            self.counters.calls_failed += 1
            log.debug("%s to %s (%s) failed: %s", type(msg).__name__, send.target_id, send.address,
                      exc.code() if isinstance(exc, grpc.aio.AioRpcError) else exc)
        except wire.WireError as exc:
            self.counters.calls_failed += 1
            log.warning("malformed reply from %s (%s): %s", send.target_id, send.address, exc)
        else:
            self.poke()

    async def probe_for(self, req: PingReq, ping: Ping):
        """Relay side of an indirect probe: ping the target, return the Ack for the requester or None."""
        try:
            stub = self._dial(req.target_address, req.target)
            reply = await stub.Ping(self.outgoing(wire.ping_to_pb(ping)), timeout=self._config.probe_timeout_s)
            self.counters.bytes_in += reply.ByteSize()
            return self.core.on_relayed_ack(req, wire.ack_from_pb(reply), self.now())
        except (grpc.aio.AioRpcError, OSError, wire.WireError) as exc:
            self.counters.calls_failed += 1
            log.debug("relayed ping to %s for %s failed: %s", req.target, req.sender, exc)
            return None
