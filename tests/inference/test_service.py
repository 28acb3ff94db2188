"""The Inference RPC over mutual TLS on loopback, against real models."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh._proto import inference_pb2 as pb
from mesh.artifacts.signature import DTYPES
from mesh.inference.fixtures import mlp_model, mlp_signature
from mesh.inference.runtime import ActivationError
from mesh.inference.service import MAX_BATCH_REQUESTS, tensor_from_pb
from mesh.node.local import wait_for
from tests.inference.conftest import mediapipe_paths, model_input, outputs_of, request_for, signature_of
from tests.models import mediapipe_model, wakeword_model, wakeword_models

TIMEOUT_S = 30


async def activate(runtime, name, version, path, signature=None):
    return await asyncio.to_thread(runtime.activate, name, version, path, signature or signature_of(path))


@pytest.mark.asyncio
@pytest.mark.parametrize("path", wakeword_models() + mediapipe_paths(), ids=lambda p: p.stem)
async def test_infer_over_mtls_equals_a_direct_run(make_runtime, serve, backend, path):
    runtime = make_runtime()
    stub = await serve(runtime)
    signature = signature_of(path)
    await activate(runtime, path.stem, "2.1.0", path, signature)
    arrays = model_input(signature, seed=7)
    response = await stub.Infer(request_for(signature, arrays, stream_id="cam-3"), timeout=TIMEOUT_S)
    assert (response.model, response.version, response.stream_id) == (path.stem, "2.1.0", "cam-3")
    got = outputs_of(response)
    want = backend.load(path).invoke(arrays)
    assert list(got) == [s.name for s in signature.outputs]
    for spec, expected in zip(signature.outputs, want, strict=True):
        assert got[spec.name].dtype == expected.dtype
        np.testing.assert_array_equal(got[spec.name], expected)


@pytest.mark.asyncio
async def test_infer_batch_returns_every_result_in_order(make_runtime, serve, backend):
    runtime = make_runtime()
    stub = await serve(runtime)
    path = mediapipe_model("face_detection_short_range")
    signature = signature_of(path)
    await activate(runtime, "face", "1", path, signature)
    inputs = [model_input(signature, seed=i) for i in range(6)]

    async def requests():
        for i, arrays in enumerate(inputs):
            yield request_for(signature, arrays, stream_id=f"s{i}")

    reply = await stub.InferBatch(requests(), timeout=TIMEOUT_S)
    assert [r.stream_id for r in reply.results] == [f"s{i}" for i in range(6)]
    direct = backend.load(path)
    for result, arrays in zip(reply.results, inputs, strict=True):
        assert result.version == "1"
        np.testing.assert_array_equal(outputs_of(result)["regressors"], direct.invoke(arrays)[0])


@pytest.mark.asyncio
async def test_status_codes(make_runtime, serve):
    runtime = make_runtime(workers=1, max_pending=1)
    stub = await serve(runtime)
    path = mediapipe_model("hand_landmark_full")
    signature = signature_of(path)
    request = request_for(signature, model_input(signature))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Infer(request, timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await activate(runtime, "hand", "1", path, signature)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Infer(pb.InferRequest(model="face", inputs=request.inputs), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    # One worker, one queue slot: of many concurrent calls some are refused, the rest answered.
    outcomes = await asyncio.gather(*(stub.Infer(request, timeout=TIMEOUT_S) for _ in range(12)),
                                    return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert refused and all(o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for o in refused)
    assert any(isinstance(o, pb.InferResponse) and o.version == "1" for o in outcomes)


@pytest.mark.asyncio
async def test_oversized_batch_is_refused(make_runtime, serve):
    runtime = make_runtime(max_pending=1000)
    stub = await serve(runtime)
    path = wakeword_model("okay_nabu")
    signature = signature_of(path)
    await activate(runtime, "nabu", "1", path, signature)
    request = request_for(signature, model_input(signature))

    async def requests():
        for _ in range(MAX_BATCH_REQUESTS + 1):
            yield request

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.InferBatch(requests(), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"at most {MAX_BATCH_REQUESTS}" in info.value.details()


@pytest.mark.asyncio
async def test_bad_batch_item_names_its_index(make_runtime, serve):
    runtime = make_runtime()
    stub = await serve(runtime)
    path = wakeword_model("alexa")
    signature = signature_of(path)
    await activate(runtime, "alexa", "1", path, signature)
    good = request_for(signature, model_input(signature))
    bad = pb.InferRequest(inputs=[pb.Tensor(name=signature.inputs[0].name, dtype="int8", shape=[1, 3, 40],
                                            data=b"\0" * 7)])

    async def requests():
        for r in (good, good, bad):
            yield r

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.InferBatch(requests(), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request 2:" in info.value.details() and "carries 7 bytes" in info.value.details()


@pytest.mark.asyncio
async def test_bad_models_are_refused_while_the_previous_version_serves(make_runtime, serve, tmp_path,
                                                                        backend):
    runtime = make_runtime()
    stub = await serve(runtime)
    path = mediapipe_model("hand_landmark_lite")
    signature = signature_of(path)
    await activate(runtime, "hand", "1", path, signature)
    nan = tmp_path / "nan.tflite"
    nan.write_bytes(mlp_model(nan_bias=True))
    with pytest.raises(ActivationError, match="validation"):
        await activate(runtime, "hand", "2", nan, mlp_signature())
    with pytest.raises(ActivationError, match="signature"):
        await activate(runtime, "hand", "3", mediapipe_model("face_detection_short_range"), signature)
    arrays = model_input(signature)
    response = await stub.Infer(request_for(signature, arrays), timeout=TIMEOUT_S)
    assert response.version == "1"
    np.testing.assert_array_equal(outputs_of(response)["Identity"], backend.load(path).invoke(arrays)[0])


def _malformed_requests(spec_name: str, good: pb.Tensor) -> list[pb.InferRequest]:
    """Malformed variants of a valid request, drawn by hypothesis (collected here, sent by the async test:
    hypothesis cannot drive an async test on the session loop itself)."""
    collected: list[pb.InferRequest] = []
    n = len(good.data)
    shapes = st.lists(st.integers(-(1 << 63), (1 << 63) - 1),
                      max_size=9).filter(lambda s: s != list(good.shape))
    tensors = st.one_of(
        # wrong dtype
        st.sampled_from([d for d in DTYPES if d != good.dtype] + ["float64", "", "i1", "uint8 "]).map(
            lambda d: pb.Tensor(name=spec_name, dtype=d, shape=good.shape, data=good.data)),
        # wrong or huge shape
        shapes.map(lambda s: pb.Tensor(name=spec_name, dtype=good.dtype, shape=s, data=good.data)),
        # truncated or padded bytes
        st.integers(0, 2 * n).filter(lambda k: k != n).map(
            lambda k: pb.Tensor(name=spec_name, dtype=good.dtype, shape=good.shape,
                                data=(good.data * 2)[:k])),
        # wrong name
        st.text(max_size=20).filter(lambda t: t != spec_name).map(
            lambda t: pb.Tensor(name=t, dtype=good.dtype, shape=good.shape, data=good.data)),
    )

    @settings(max_examples=120, deadline=None, database=None)
    @given(st.lists(tensors, min_size=1, max_size=3), st.booleans())
    def collect(bad, with_good):
        collected.append(pb.InferRequest(inputs=([good] if with_good else []) + bad))

    collect()
    return collected


@pytest.mark.asyncio
async def test_malformed_tensors_get_invalid_argument_and_the_server_keeps_serving(make_runtime, serve,
                                                                                   backend):
    runtime = make_runtime()
    stub = await serve(runtime)
    path = wakeword_model("hey_mycroft")
    signature = signature_of(path)
    await activate(runtime, "mycroft", "1", path, signature)
    good_request = request_for(signature, model_input(signature))
    good = good_request.inputs[0]
    for request in _malformed_requests(signature.inputs[0].name, good):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Infer(request, timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, info.value.details())
        assert info.value.details()
    response = await stub.Infer(good_request, timeout=TIMEOUT_S)
    assert response.version == "1" and outputs_of(response)["StatefulPartitionedCall:0"].shape == (1, 1)


@pytest.mark.asyncio
async def test_hot_swap_and_rollback_under_load_lose_no_request(make_runtime, serve, backend):
    """Clients call Infer continuously while v2 is activated and then rolled back to v1: no call fails,
    and every response's outputs are exactly what the version it names produces."""
    runtime = make_runtime()
    stub = await serve(runtime)
    v1, v2 = mediapipe_model("hand_landmark_lite"), mediapipe_model("hand_landmark_full")
    signature = signature_of(v1)
    arrays = model_input(signature, seed=11)
    request = request_for(signature, arrays)
    expected = {"1": backend.load(v1).invoke(arrays), "2": backend.load(v2).invoke(arrays)}
    await activate(runtime, "hand", "1", v1, signature)

    seen: list[str] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def client():
        while not stop.is_set():
            try:
                response = await stub.Infer(request, timeout=TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                failures.append(exc)
                continue
            got = outputs_of(response)
            if not all(np.array_equal(got[s.name], want)
                       for s, want in zip(signature.outputs, expected[response.version], strict=True)):
                failures.append(AssertionError(f"outputs do not match version {response.version}"))
            seen.append(response.version)

    clients = [asyncio.create_task(client()) for _ in range(4)]
    try:
        await wait_for(lambda: len(seen) >= 20, TIMEOUT_S, "20 responses from v1", interval_s=0.005)
        before = len(seen)
        await activate(runtime, "hand", "2", v2, signature)
        during_activation = len(seen) - before
        await wait_for(lambda: seen[-16:] == ["2"] * 16, TIMEOUT_S, "responses from v2", interval_s=0.005)
        await asyncio.to_thread(runtime.rollback)
        await wait_for(lambda: seen[-16:] == ["1"] * 16, TIMEOUT_S, "responses from v1 after rollback",
                       interval_s=0.005)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert failures == []
    assert during_activation > 0, "no request was answered while v2 was being loaded"
    assert set(seen) == {"1", "2"}
    health = {h.version: h for h in runtime.health.snapshot()}
    assert health["1"].requests + health["2"].requests == len(seen)
    assert health["1"].error_count == health["2"].error_count == 0


@pytest.mark.asyncio
async def test_missed_deadlines_are_reported_and_counted(make_runtime, serve):
    """A call queued behind more work than its deadline allows gets DEADLINE_EXCEEDED, and the runtime counts
    it against the version: the worker skips a queued request whose deadline has passed."""
    runtime = make_runtime(workers=1)
    stub = await serve(runtime)
    path = mediapipe_model("pose_landmark_full")
    signature = signature_of(path)
    await activate(runtime, "pose", "1", path, signature)
    request = request_for(signature, model_input(signature))
    await stub.Infer(request, timeout=TIMEOUT_S)  # TLS handshake out of the way
    # ~20 x 9 ms of work ahead of the call on the only worker.
    tensors = [tensor_from_pb(t) for t in request.inputs]
    backlog = [runtime.submit(tensors) for _ in range(20)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Infer(request, timeout=0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.gather(*(asyncio.wrap_future(f) for f in backlog))

    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT_S
    while runtime.health.version("pose", "1").requests < 22:
        assert loop.time() < deadline, "the runtime did not account for the late call"
        await asyncio.sleep(0.01)
    health = runtime.health.version("pose", "1")
    assert health.requests == 22
    assert health.errors == {"exception": 0, "non_finite": 0, "deadline_exceeded": 1}
