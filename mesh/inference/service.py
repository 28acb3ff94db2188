"""gRPC adapter for the model runtime: the Inference service (unary and
client-streaming batch), mapping runtime errors to gRPC statuses.

    add_to_server(server, runtime)   # any grpc.aio server (mTLS from mesh.identity.tls)

Status codes: INVALID_ARGUMENT for a tensor that does not fit the active
signature, the request limits or (NaN, infinity) the signature's input policy
(the message names the tensor), FAILED_PRECONDITION when no model is active,
NOT_FOUND when the request names another model, RESOURCE_EXHAUSTED when the
worker queue or a batch is full, or when the outputs would not fit in one
message, DEADLINE_EXCEEDED when the result missed the call's deadline,
INTERNAL when the interpreter fails. A request message larger than
tensors.MAX_MESSAGE_BYTES never reaches this code: gRPC refuses it with
RESOURCE_EXHAUSTED ("Received message larger than max (N vs. M)").
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NoReturn

import grpc

from mesh._proto import inference_pb2 as pb
from mesh._proto import inference_pb2_grpc as pb_grpc
from mesh.identity.tls import peer_identity
from mesh.inference.runtime import (
    DeadlineExceeded,
    InferResult,
    InvokeFailed,
    ModelRuntime,
    NoActiveModel,
    Overloaded,
)
from mesh.inference.tensors import MAX_MESSAGE_BYTES, TensorError, WireTensor, encode_tensor

log = logging.getLogger("mesh.inference")

MAX_BATCH_REQUESTS = 256


def tensor_to_pb(tensor: WireTensor) -> pb.Tensor:
    return pb.Tensor(name=tensor.name, dtype=tensor.dtype, shape=list(tensor.shape), data=tensor.data)


def tensor_from_pb(msg: pb.Tensor) -> WireTensor:
    return WireTensor(name=msg.name, dtype=msg.dtype, shape=tuple(msg.shape), data=msg.data)


def result_to_pb(result: InferResult, stream_id: str = "") -> pb.InferResponse:
    return pb.InferResponse(model=result.model, version=result.version, stream_id=stream_id,
                            latency_s=result.latency_s,
                            outputs=[tensor_to_pb(encode_tensor(name, out)) for name, out in result.outputs])


def _response(result: InferResult, stream_id: str, max_bytes: int = MAX_MESSAGE_BYTES) -> pb.InferResponse:
    """`result_to_pb`, refused when it would not fit in one message (outputs of a model whose output
    shapes depend on its input; fixed ones are checked at activation)."""
    response = result_to_pb(result, stream_id)
    size = response.ByteSize()
    if size > max_bytes:
        raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"the outputs of model {result.model} {result.version} take {size} bytes, more "
                       f"than one message carries ({max_bytes}); send smaller inputs")
    return response


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class InferenceServicer(pb_grpc.InferenceServicer):
    """Infer/InferBatch for any fleet member (the server's mTLS already requires a fleet certificate)."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self._runtime = runtime

    def _submit(self, request: pb.InferRequest, deadline: float | None, what: str) -> asyncio.Future:
        try:
            future = self._runtime.submit([tensor_from_pb(t) for t in request.inputs], model=request.model,
                                          deadline=deadline)
        except TensorError as exc:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{what}{exc}") from None
        except NoActiveModel as exc:
            code = grpc.StatusCode.NOT_FOUND if request.model and self._runtime.active else \
                grpc.StatusCode.FAILED_PRECONDITION
            raise _Refused(code, str(exc)) from None
        except Overloaded as exc:
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        # A call cancelled by its client (or its deadline) leaves the work queued: the worker then
        # finds the deadline passed and counts it, instead of the request vanishing from the health
        # counters.
        wrapped = asyncio.wrap_future(future)
        wrapped.add_done_callback(_retrieve)
        return wrapped

    @staticmethod
    async def _result(future: asyncio.Future) -> InferResult:
        try:
            return await asyncio.shield(future)
        except DeadlineExceeded as exc:
            raise _Refused(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
        except InvokeFailed as exc:
            raise _Refused(grpc.StatusCode.INTERNAL, str(exc)) from None

    @staticmethod
    async def _abort(context, peer: str, method: str, refused: _Refused) -> NoReturn:
        level = logging.WARNING if refused.code in (grpc.StatusCode.INTERNAL,) else logging.INFO
        log.log(level, "%s from %s refused (%s): %s", method, peer, refused.code.name, refused)
        await context.abort(refused.code, str(refused))
        raise AssertionError("grpc's context.abort returned")  # it raises; this tells type checkers

    async def _caller(self, context) -> str:
        identity = peer_identity(context)
        if identity is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "inference calls need a fleet certificate")
            raise AssertionError("grpc's context.abort returned")  # it raises; this tells type checkers
        return identity.name

    async def Infer(self, request: pb.InferRequest, context) -> pb.InferResponse:
        caller = await self._caller(context)
        try:
            result = await self._result(self._submit(request, _deadline(context), ""))
            return _response(result, request.stream_id)
        except _Refused as refused:
            await self._abort(context, caller, "Infer", refused)

    async def InferBatch(self, request_iterator, context) -> pb.InferBatchResponse:
        caller = await self._caller(context)
        deadline = _deadline(context)
        futures: list[tuple[asyncio.Future, str]] = []
        try:
            async for request in request_iterator:
                if len(futures) >= MAX_BATCH_REQUESTS:
                    raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"a batch holds at most {MAX_BATCH_REQUESTS} requests; split it")
                futures.append((self._submit(request, deadline, f"request {len(futures)}: "),
                                request.stream_id))
            results = [result_to_pb(await self._result(f), stream_id) for f, stream_id in futures]
            batch = pb.InferBatchResponse(results=results)
            if batch.ByteSize() > MAX_MESSAGE_BYTES:
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the batch's {len(results)} results take {batch.ByteSize()} bytes, more than "
                               f"one message carries ({MAX_MESSAGE_BYTES}); send smaller batches")
            return batch
        except _Refused as refused:
            await self._abort(context, caller, "InferBatch", refused)


def _retrieve(future: asyncio.Future) -> None:
    # Mark a failed result as seen, so asyncio does not log it as never retrieved.
    if not future.cancelled():
        future.exception()


def _deadline(context) -> float | None:
    remaining_s = context.time_remaining()
    return None if remaining_s is None else time.monotonic() + remaining_s


def add_to_server(server: grpc.aio.Server, runtime: ModelRuntime) -> InferenceServicer:
    """Serve `runtime` on `server` (add before `server.start()`)."""
    servicer = InferenceServicer(runtime)
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    return servicer
