"""Server interceptors every node runs: who may call at all (revoked or expired certificates are
refused on every service), fault injection, and strict request decoding."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable

import grpc

from mesh.identity.tls import PeerIdentity, peer_identity
from mesh.node.peers import Faults

log = logging.getLogger("mesh.node.rpc")


def _wrap_unary(handler: grpc.RpcMethodHandler, behaviour_factory) -> grpc.RpcMethodHandler:
    """Rebuild a unary-request handler (unary or server-streaming reply) around
    `behaviour_factory(inner, deserialize)`, which receives the raw request bytes."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            behaviour_factory(handler.unary_unary, handler.request_deserializer),
            request_deserializer=None, response_serializer=handler.response_serializer)
    inner_stream = handler.unary_stream
    gate = behaviour_factory(_first_step, handler.request_deserializer)

    async def streaming(raw: bytes, context):
        request = await gate(raw, context)  # aborts on bad input or a cut link
        async for item in inner_stream(request, context):
            yield item

    return grpc.unary_stream_rpc_method_handler(
        streaming, request_deserializer=None, response_serializer=handler.response_serializer)


async def _first_step(request, context):
    """For streaming replies the checks run first; this hands the decoded request on."""
    return request


def _has_unary_request(handler: grpc.RpcMethodHandler | None) -> bool:
    return handler is not None and (handler.unary_unary is not None or handler.unary_stream is not None)


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Undecodable requests get INVALID_ARGUMENT (gRPC's own answer would be
    INTERNAL, which blames the server), and are logged with the caller."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if not _has_unary_request(handler) or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method

        def factory(inner, deserialize):
            async def decoded(raw: bytes, context):
                try:
                    request = deserialize(raw)
                except Exception as exc:  # protobuf raises DecodeError, but any failure means bad input
                    log.warning("undecodable %s request (%d bytes) from %s: %s", method, len(raw),
                                context.peer(), exc)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"request is not a valid message for {method}: {exc}")
                return await inner(request, context)
            return decoded

        return _wrap_unary(handler, factory)


Check = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


def _wrap_checked(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
    """The same handler (any of the four kinds), with `check(context)` run before it; `check`
    aborts the call to refuse it."""
    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request, context):
            await check(context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(request_iterator, context):
            await check(context)
            return await inner_su(request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    inner = handler.unary_stream if handler.unary_stream is not None else handler.stream_stream
    make = grpc.unary_stream_rpc_method_handler if handler.unary_stream is not None \
        else grpc.stream_stream_rpc_method_handler
    if inspect.isasyncgenfunction(inner):
        async def streaming_gen(request, context):
            await check(context)
            async for item in inner(request, context):
                yield item

        return make(streaming_gen, **kwargs)

    async def streaming(request, context):  # replies through context.write
        await check(context)
        return await inner(request, context)

    return make(streaming, **kwargs)


class FaultInterceptor(grpc.aio.ServerInterceptor):
    """Refuses incoming calls (every kind, Raft streams too) from peers that `Faults` has cut off,
    with UNAVAILABLE as a cut link would."""

    def __init__(self, faults: Faults) -> None:
        self._faults = faults

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        faults = self._faults

        async def check(context) -> None:
            peer = peer_identity(context) if faults.blocked else None
            if peer is not None and faults.is_blocked(peer.name):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "link cut by fault injection")

        return _wrap_checked(handler, check)


class TrustInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, on every service, calls whose certificate `refusal(peer)` names a reason for
    (revoked by an operator, expired): PERMISSION_DENIED with that reason, logged once per
    certificate. gRPC Python has no hook into certificate verification, so this runs on each
    call (and each stream) from the certificate the connection presented."""

    def __init__(self, refusal: Callable[[PeerIdentity], str | None]) -> None:
        self._refusal = refusal
        self._logged: set[tuple[str, str]] = set()
        self.refused = 0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        async def check(context) -> None:
            peer = peer_identity(context)
            why = self._refusal(peer) if peer is not None else None
            if peer is not None and why is not None:
                self.refused += 1
                if (peer.name, peer.serial) not in self._logged:
                    self._logged.add((peer.name, peer.serial))
                    log.warning("refused %s from %s %s (certificate %s): %s", method, peer.role.value,
                                peer.name, peer.serial, why)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

        return _wrap_checked(handler, check)
