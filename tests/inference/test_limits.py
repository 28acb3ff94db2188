"""Request policy and size limits: non-finite inputs refused unless the manifest allows them (and
counted apart from model errors), and the tensor limits and the gRPC message cap as one setting."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from mesh._proto import inference_pb2 as pb
from mesh._proto import inference_pb2_grpc as pb_grpc
from mesh.identity.tls import channel_credentials, secure_channel_options, server_credentials
from mesh.inference.fixtures import (
    PARTLY_NAN_LAYERS,
    mlp_model,
    mlp_signature,
    partly_nan_input,
    partly_nan_model,
)
from mesh.inference.runtime import ActivationError
from mesh.inference.service import add_to_server
from mesh.inference.tensors import MAX_MESSAGE_BYTES, TensorError, TensorLimits, encode_tensor

TIMEOUT_S = 30


def _activate(runtime, tmp_path, model: bytes, signature, version="1"):
    path = tmp_path / f"model-{version}.tflite"
    path.write_bytes(model)
    return runtime.activate("m", version, path, signature)


def _request(name: str, array: np.ndarray) -> pb.InferRequest:
    t = encode_tensor(name, array)
    return pb.InferRequest(inputs=[pb.Tensor(name=t.name, dtype=t.dtype, shape=list(t.shape), data=t.data)])


def test_the_node_uses_one_message_limit_for_grpc_and_requests():
    from mesh.node import peers

    assert peers.MAX_MESSAGE_BYTES == MAX_MESSAGE_BYTES
    assert TensorLimits().max_request_bytes < MAX_MESSAGE_BYTES


@pytest.mark.parametrize("sizes, kind", [((1_100_000, 1), "inputs"), ((1, 1_100_000), "outputs")])
def test_a_model_whose_requests_cannot_fit_in_a_message_is_refused_at_activation(make_runtime, tmp_path,
                                                                                 sizes, kind):
    runtime = make_runtime()
    _activate(runtime, tmp_path, mlp_model((4, 2)), mlp_signature((4, 2)), version="1")
    with pytest.raises(ActivationError) as info:
        _activate(runtime, tmp_path, mlp_model(sizes), mlp_signature(sizes), version="2")
    assert info.value.stage == "limits"
    assert f"its {kind} take at least 4400000 bytes" in info.value.reason
    assert str(MAX_MESSAGE_BYTES) in info.value.reason
    assert runtime.active.version == "1"


def test_non_finite_inputs_pass_when_the_manifest_allows_them(make_runtime, tmp_path):
    runtime = make_runtime()
    allowed = dataclasses.replace(mlp_signature(PARTLY_NAN_LAYERS), allow_non_finite_inputs=True)
    info = _activate(runtime, tmp_path, partly_nan_model(), allowed)
    assert info.signature.allow_non_finite_inputs
    x = partly_nan_input(bad=False, rng=np.random.default_rng(0))
    x[0, 3] = np.nan
    result = runtime.infer([encode_tensor("input", x)], timeout_s=TIMEOUT_S)
    assert not result.finite  # served: the model's NaN output is this version's error
    assert runtime.health.version("m", "1").errors["non_finite"] == 1
    assert runtime.health.refusals() == {}
    # ... and the policy survives a rollback to this version.
    _activate(runtime, tmp_path, partly_nan_model(seed=1), mlp_signature(PARTLY_NAN_LAYERS), version="2")
    with pytest.raises(TensorError):
        runtime.submit([encode_tensor("input", x)])
    assert runtime.rollback().signature.allow_non_finite_inputs


@pytest.mark.asyncio
async def test_non_finite_input_gets_invalid_argument_and_is_counted_apart(make_runtime, serve, tmp_path):
    runtime = make_runtime()
    stub = await serve(runtime)
    signature = mlp_signature(PARTLY_NAN_LAYERS)
    _activate(runtime, tmp_path, partly_nan_model(), signature)
    rng = np.random.default_rng(1)
    for value in (np.nan, np.inf):
        x = partly_nan_input(bad=False, rng=rng)
        x[0, 5] = value
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Infer(_request("input", x), timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'input'" in info.value.details() and "NaN or infinite" in info.value.details()
    reply = await stub.Infer(_request("input", partly_nan_input(bad=False, rng=rng)), timeout=TIMEOUT_S)
    assert reply.version == "1"
    health = runtime.health.version("m", "1")
    assert health.requests == 1 and health.error_count == 0
    assert runtime.health.refusals() == {("m", "1", "non_finite"): 2}


@pytest.mark.asyncio
async def test_the_largest_request_that_fits_is_served_and_a_larger_message_is_refused(
        make_runtime, inference_fleet, tmp_path):
    """A server with the node's message options: a 4,000,000-byte input goes through; a message
    past the cap is refused by gRPC with RESOURCE_EXHAUSTED naming both sizes."""
    runtime = make_runtime(workers=1)
    sizes = (1_000_000, 1)
    _activate(runtime, tmp_path, mlp_model(sizes), mlp_signature(sizes))
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.aio.server(options=options)
    add_to_server(server, runtime)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(inference_fleet.server))
    await server.start()
    # The client sends whatever it is given: the refusal below is the server's.
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_credentials(inference_fleet.client),
                                      options=secure_channel_options(peer_id="node-a"))
    try:
        stub = pb_grpc.InferenceStub(channel)
        x = np.random.default_rng(2).random((1, 1_000_000)).astype(np.float32)
        reply = await stub.Infer(_request("input", x), timeout=TIMEOUT_S)
        assert reply.version == "1"
        oversize = _request("input", x)
        oversize.inputs.append(pb.Tensor(name="padding", dtype="int8", shape=[300_000],
                                         data=bytes(300_000)))
        assert oversize.ByteSize() > MAX_MESSAGE_BYTES
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Infer(oversize, timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = info.value.details()
        assert "Received message larger than max" in details and str(MAX_MESSAGE_BYTES) in details, details
    finally:
        await channel.close()
        await server.stop(None)
