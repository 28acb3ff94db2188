"""Server interceptors every node runs: strict request decoding and fault injection."""

from __future__ import annotations

import logging

import grpc

from mesh.identity.tls import peer_identity
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


class FaultInterceptor(grpc.aio.ServerInterceptor):
    """Refuses incoming calls from peers that `Faults` has cut off, with UNAVAILABLE as a cut link would."""

    def __init__(self, faults: Faults) -> None:
        self._faults = faults

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if not _has_unary_request(handler):
            return handler
        faults = self._faults

        def factory(inner, deserialize):
            async def guarded(raw, context):
                peer = peer_identity(context) if faults.blocked else None
                if peer is not None and faults.is_blocked(peer.name):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "link cut by fault injection")
                return await inner(raw if deserialize is None else deserialize(raw), context)
            return guarded

        return _wrap_unary(handler, factory)
