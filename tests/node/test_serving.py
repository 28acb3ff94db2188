"""Nodes serve inference on what distribution brought them: every node activates
the newest verified version of its configured model, answers Infer over mTLS with
the version that produced each output, and refuses a bad release while it keeps
serving the previous one."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from mesh._proto import inference_pb2, inference_pb2_grpc
from mesh.artifacts.publish import publish
from mesh.identity.signing import KeyRole, load_signing_key
from mesh.identity.tls import channel_credentials, secure_channel_options
from mesh.inference.backend import load_backend
from mesh.inference.fixtures import mlp_model
from mesh.node.local import wait_for

pytestmark = pytest.mark.asyncio

LAYERS = (16, 32, 4)


def serving(cluster, version: str) -> bool:
    return all(n.inference.active is not None and n.inference.active.version == version
               for n in cluster.nodes.values())


async def infer(node, fleet, x: np.ndarray) -> inference_pb2.InferResponse:
    creds = channel_credentials(fleet.node_credentials("client-1"))
    options = secure_channel_options(peer_id=node.config.node_id)
    async with grpc.aio.secure_channel(node.address, creds, options=options) as channel:
        request = inference_pb2.InferRequest(inputs=[inference_pb2.Tensor(
            name="input", dtype="float32", shape=list(x.shape), data=x.tobytes())])
        return await inference_pb2_grpc.InferenceStub(channel).Infer(request, timeout=10)


async def test_every_node_serves_the_newest_release_and_refuses_a_bad_one(cluster, fleet, tmp_path):
    c = await cluster(4, inference={"model": "mlp", "workers": 1})
    await wait_for(c.converged, 10.0, what="convergence")
    origin = c.nodes["node-00"]
    key = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
    paths = {}
    for version, seed, nan in (("1", 1, False), ("2", 2, False), ("3", 3, True)):
        paths[version] = tmp_path / f"mlp-{version}.tflite"
        paths[version].write_bytes(mlp_model(LAYERS, seed=seed, nan_bias=nan))
    x = np.random.default_rng(7).standard_normal((1, LAYERS[0])).astype(np.float32)

    def direct(version: str) -> np.ndarray:
        return load_backend().load(paths[version]).invoke([x])[0]

    origin.distributor.add_published(publish(paths["1"], name="mlp", version="1", key=key,
                                             store=origin.store))
    await wait_for(lambda: serving(c, "1"), 30.0, what="every node serves mlp 1")
    for node in c.nodes.values():
        reply = await infer(node, fleet, x)
        assert (reply.model, reply.version) == ("mlp", "1")
        out = np.frombuffer(reply.outputs[0].data, dtype=np.float32).reshape(tuple(reply.outputs[0].shape))
        np.testing.assert_array_equal(out, direct("1"))

    origin.distributor.add_published(publish(paths["2"], name="mlp", version="2", key=key,
                                             store=origin.store))
    await wait_for(lambda: serving(c, "2"), 30.0, what="every node swaps to mlp 2")
    assert all(n.inference.previous.version == "1" for n in c.nodes.values())

    # v3 loads but every output is NaN: it spreads, is refused at activation, v2 keeps serving.
    origin.distributor.add_published(publish(paths["3"], name="mlp", version="3", key=key,
                                             store=origin.store))
    await wait_for(lambda: all(n.store.is_complete(n.store.load_manifest("mlp", "3").manifest)
                               if ("mlp", "3") in n.store.stored_versions() else False
                               for n in c.nodes.values()),
                   30.0, what="mlp 3 distributed")
    await wait_for(lambda: all("3" in n.activator.refused for n in c.nodes.values()), 10.0,
                   what="every node refuses mlp 3")
    for node in c.nodes.values():
        assert node.inference.active.version == "2"
        assert "finite" in node.inference.status().last_activation_error.lower() or \
            "nan" in node.inference.status().last_activation_error.lower()
        reply = await infer(node, fleet, x)
        assert reply.version == "2"
        out = np.frombuffer(reply.outputs[0].data, dtype=np.float32).reshape(tuple(reply.outputs[0].shape))
        np.testing.assert_array_equal(out, direct("2"))
    # The rollback target (v1) and the active version stay on disk whatever arrives later.
    assert all({("mlp", "1"), ("mlp", "2")} <= set(n.store.stored_versions()) for n in c.nodes.values())


async def test_a_node_without_a_model_refuses_infer_with_failed_precondition(cluster, fleet):
    c = await cluster(1)
    x = np.zeros((1, 4), dtype=np.float32)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await infer(c.nodes["node-00"], fleet, x)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "[inference] model" in info.value.details()
