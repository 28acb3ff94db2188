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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

import grpc

from mesh._proto import membership_pb2 as pb
from mesh._proto import membership_pb2_grpc as pb_grpc
from mesh.identity.ca import Role
from mesh.identity.tls import peer_identity
from mesh.membership import wire
from mesh.membership.config import SITE_POOL
from mesh.membership.core import Membership
from mesh.membership.messages import (
    Ack,
    EventKind,
    Gossip,
    MemberEvent,
    Nack,
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
    # Push-pull carries pages of the member list; it is counted apart so SWIM's
    # own per-node load, which should not grow with n, can be seen on its own.
    push_pull_bytes_out: int = 0
    calls_failed: int = 0
    # Requests we answered only after the caller had given up (its deadline
    # passed or it cancelled): the reply is not sent.
    replies_dropped: int = 0


async def _authenticated_sender(context: grpc.aio.ServicerContext, sender: str) -> None:
    """The message's `sender` must be the node named in the caller's certificate:
    a node may speak only for itself."""
    peer = peer_identity(context)
    if peer is None or peer.role is not Role.NODE:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            "membership calls need a fleet node certificate")
        raise AssertionError("grpc's context.abort returned")  # it raises; this tells type checkers
    if peer.name != sender:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"message claims sender {sender!r} but the caller's certificate is for "
                            f"{peer.name!r}")


def _caller_gone(context: grpc.aio.ServicerContext) -> bool:
    """The caller cancelled or its deadline passed: nobody is waiting for our reply."""
    if context.cancelled() or context.done():
        return True
    remaining_s = context.time_remaining()
    return remaining_s is not None and remaining_s <= 0


REDIRECT_KEY = "fleetmesh-pool-members"
"""Trailing metadata of a NOT_FOUND for a pool this node does not serve: members that do."""
MAX_REDIRECTS = 8


def _redirected(exc: grpc.aio.AioRpcError) -> list[str]:
    """The addresses a NOT_FOUND named (at most MAX_REDIRECTS host:port strings), or []."""
    for key, value in exc.trailing_metadata() or ():
        if key == REDIRECT_KEY and isinstance(value, str):
            return [a for a in value.split(",") if 3 <= len(a) <= 255 and ":" in a][:MAX_REDIRECTS]
    return []


class MembershipServicer(pb_grpc.MembershipServicer):
    """Incoming membership calls, routed by the message's `pool` to that pool's runner.

    A node runs one `SwimRunner` per pool it belongs to (its site pool, and the
    federation pool if it is a site representative); a plain runner is taken as
    the site pool's. A request for a pool this node does not serve is NOT_FOUND.

    A reply to a caller that has gone away is not sent: when the loop was busy
    and the caller's deadline passed, sending it fails inside gRPC, which logs
    an ExecuteBatchError traceback for what is an ordinary late answer. The
    handler ends as cancelled instead, which gRPC logs at debug level.
    """

    def __init__(self, runners: SwimRunner | Mapping[str, SwimRunner],
                 redirect: Callable[[str], list[str]] | None = None) -> None:
        """`redirect(pool)`: addresses of nodes that serve a pool this node does not (sites mode: its
        site's representatives, for a federation join that reached a node that is not one)."""
        self._runners = {SITE_POOL: runners} if isinstance(runners, SwimRunner) else dict(runners)
        self._redirect = redirect

    def serve(self, pool: str, runner: SwimRunner) -> None:
        """From now on, requests for `pool` go to `runner` (a representative joining the federation)."""
        self._runners[pool] = runner

    def unserve(self, pool: str) -> None:
        """Requests for `pool` are NOT_FOUND from now on (a representative that left)."""
        self._runners.pop(pool, None)

    async def _parse(self, context, parse, request):
        try:
            return parse(request)
        except wire.WireError as exc:
            log.warning("rejected malformed %s from %s: %s", type(request).__name__, context.peer(), exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _runner(self, context, message, request) -> SwimRunner:
        await _authenticated_sender(context, message.sender)
        runner = self._runners.get(message.pool)
        if runner is None:
            others = self._redirect(message.pool)[:MAX_REDIRECTS] if self._redirect else []
            if others and not _caller_gone(context):
                await context.abort(grpc.StatusCode.NOT_FOUND,
                                    f"this node is not a member of the {message.pool or 'site'!r} pool; "
                                    f"these are: {', '.join(others)}",
                                    trailing_metadata=((REDIRECT_KEY, ",".join(others)),))
            await self._abort(context, grpc.StatusCode.NOT_FOUND,
                              f"this node is not a member of the {message.pool or 'site'!r} pool")
        runner.counters.bytes_in += request.ByteSize()
        return runner

    async def _abort(self, context, code: grpc.StatusCode, details: str) -> NoReturn:
        if _caller_gone(context):
            raise asyncio.CancelledError(f"caller gave up before: {details}")
        await context.abort(code, details)
        raise AssertionError("grpc's context.abort returned")  # it raises; this tells type checkers

    def _reply(self, context, runner: SwimRunner, message):
        if _caller_gone(context):
            runner.counters.replies_dropped += 1
            log.debug("caller %s gave up before our %s; not replying", context.peer(), type(message).__name__)
            raise asyncio.CancelledError("the caller has gone away")
        return runner.outgoing(message)

    async def Ping(self, request: pb.Ping, context) -> pb.Ack:
        ping = await self._parse(context, wire.ping_from_pb, request)
        runner = await self._runner(context, ping, request)
        try:
            ack = runner.core.on_ping(ping, runner.now())
        except WrongTarget as exc:
            await self._abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        runner.poke()
        return self._reply(context, runner, wire.ack_to_pb(ack))

    async def PingReq(self, request: pb.PingReq, context) -> pb.Ack:
        req = await self._parse(context, wire.ping_req_from_pb, request)
        runner = await self._runner(context, req, request)
        try:
            ping = runner.core.on_ping_req(req, runner.now())
        except UnknownMember as exc:
            await self._abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        answer = await runner.probe_for(req, ping, runner.core.relay_timeout_s(context.time_remaining()))
        runner.poke()
        return self._reply(context, runner, wire.ack_to_pb(answer))

    async def Gossip(self, request: pb.Gossip, context) -> pb.Gossip:
        gossip = await self._parse(context, wire.gossip_from_pb, request)
        runner = await self._runner(context, gossip, request)
        reply = runner.core.on_gossip(gossip, runner.now())
        runner.poke()
        return self._reply(context, runner, wire.gossip_to_pb(reply))

    async def PushPull(self, request: pb.PushPull, context) -> pb.PushPull:
        pp = await self._parse(context, wire.push_pull_from_pb, request)
        runner = await self._runner(context, pp, request)
        reply = runner.core.on_push_pull(pp, runner.now())
        runner.poke()
        return self._reply(context, runner, wire.push_pull_to_pb(reply))


class SwimRunner:
    """Drives one `Membership` core on the running asyncio loop.

    The core says when it next needs `tick`; the runner sleeps until then or
    until an incoming message may have moved that deadline (`poke`). Each
    `Send` becomes one unary call whose reply is fed back to the core, with the
    deadline the core gave it.
    """

    def __init__(self, core: Membership, dial: Dial, *, push_pull_timeout_s: float = 5.0,
                 on_events: Callable[[list[MemberEvent]], None] | None = None,
                 on_redirect: Callable[[list[str]], None] | None = None) -> None:
        """`on_redirect(addresses)`: a push-pull reached a node outside this pool, which named
        members of it (see `MembershipServicer`'s `redirect`)."""
        self.core = core
        self._on_redirect = on_redirect
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

    def rejoin(self, seeds: list[str]) -> None:
        """Exchange state with `seeds` again (a federation member that knows no other site yet)."""
        self._send_all(self.core.join(seeds, self.now(), remember=False))

    async def leave(self, timeout_s: float = 2.0) -> None:
        """Tell peers we are leaving and wait (bounded) until they have heard it."""
        sends = self.core.leave(self.now())
        calls = [asyncio.ensure_future(self._deliver(s)) for s in sends]
        if not calls:
            return
        # asyncio.wait, not wait_for(gather): on a timeout wait_for cancelled the gather, whose
        # CancelledError nobody retrieved ("_GatheringFuture exception was never retrieved" in the
        # log), and 3.11's wait_for can lose a cancellation of the caller.
        try:
            _, pending = await asyncio.wait(calls, timeout=timeout_s)
        finally:  # on a timeout, and if our caller is cancelled meanwhile: no call outlives the leave
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(calls)} peers did not acknowledge the leave in "
                               f"{timeout_s:.1f}s")

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
            # META changes whenever a peer's holdings change: too chatty for info.
            level = logging.DEBUG if event.kind is EventKind.META else logging.INFO
            log.log(level, "member %s %s (incarnation %d)", event.node_id, event.kind.value,
                    event.incarnation)
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

    def _timeout_s(self, send: Send) -> float:
        if send.timeout_s is not None:
            return send.timeout_s
        msg, config = send.message, self._config
        if isinstance(msg, Ping):
            return config.probe_timeout_s
        if isinstance(msg, PingReq):
            return config.probe_interval_s - config.probe_timeout_s
        if isinstance(msg, PushPull):
            return self._push_pull_timeout_s
        return config.probe_interval_s

    async def _deliver(self, send: Send) -> None:
        msg = send.message
        timeout_s = self._timeout_s(send)
        try:
            stub = self._dial(send.address, send.target_id)
            if isinstance(msg, Ping):
                reply = await stub.Ping(self.outgoing(wire.ping_to_pb(msg)), timeout=timeout_s)
                self.counters.bytes_in += reply.ByteSize()
                ack = wire.ack_from_pb(reply)
                if isinstance(ack, Ack):  # a nack only answers a PingReq
                    self.core.on_ack(ack, self.now())
            elif isinstance(msg, PingReq):
                reply = await stub.PingReq(self.outgoing(wire.ping_req_to_pb(msg)), timeout=timeout_s)
                self.counters.bytes_in += reply.ByteSize()
                answer = wire.ack_from_pb(reply)
                if isinstance(answer, Nack):
                    self.core.on_nack(answer, self.now())
                else:
                    self.core.on_ack(answer, self.now())
            elif isinstance(msg, Gossip):
                reply = await stub.Gossip(self.outgoing(wire.gossip_to_pb(msg)), timeout=timeout_s)
                self.counters.bytes_in += reply.ByteSize()
                self.core.on_gossip_reply(wire.gossip_from_pb(reply), self.now())
            elif isinstance(msg, PushPull):
                reply = await stub.PushPull(self.outgoing(wire.push_pull_to_pb(msg)), timeout=timeout_s)
                self.counters.bytes_in += reply.ByteSize()
                self._send_all(self.core.on_push_pull_reply(wire.push_pull_from_pb(reply), self.now()))
            else:  # pragma: no cover - the core only emits the four requests above
                raise TypeError(f"core asked to send {type(msg).__name__}")
        except (grpc.aio.AioRpcError, OSError) as exc:
            # OSError: the adapter refused to dial (fault injection, bad address).
            self.counters.calls_failed += 1
            if isinstance(exc, grpc.aio.AioRpcError) and self._on_redirect is not None \
                    and exc.code() is grpc.StatusCode.NOT_FOUND and isinstance(msg, PushPull):
                named = _redirected(exc)
                if named:
                    self._on_redirect(named)
            log.debug("%s to %s (%s) failed: %s", type(msg).__name__, send.target_id, send.address,
                      exc.code() if isinstance(exc, grpc.aio.AioRpcError) else exc)
        except wire.WireError as exc:
            self.counters.calls_failed += 1
            log.warning("malformed reply from %s (%s): %s", send.target_id, send.address, exc)
        else:
            self.poke()

    async def probe_for(self, req: PingReq, ping: Ping, timeout_s: float) -> Ack | Nack:
        """Relay side of an indirect probe: ping the target for at most `timeout_s`;
        the Ack to relay, or a Nack if the target did not answer."""
        try:
            stub = self._dial(req.target_address, req.target)
            reply = await stub.Ping(self.outgoing(wire.ping_to_pb(ping)), timeout=timeout_s)
            self.counters.bytes_in += reply.ByteSize()
            answer = wire.ack_from_pb(reply)
            if isinstance(answer, Ack):
                return self.core.on_relayed_ack(req, answer, self.now())
        except (grpc.aio.AioRpcError, OSError, wire.WireError, WrongTarget) as exc:
            self.counters.calls_failed += 1
            log.debug("relayed ping to %s for %s failed: %s", req.target, req.sender, exc)
        return self.core.nack_for(req, self.now())
