"""Fixtures for inference tests: a model runtime on the session's backend and a
real grpc.aio server with mTLS serving it.

The backend is LiteRT unless $MESH_INFERENCE_BACKEND names another
(scripts/test-tflite-runtime.sh runs these tests with tflite-runtime).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
import numpy as np
import pytest
import pytest_asyncio

from mesh._proto import inference_pb2 as pb
from mesh._proto import inference_pb2_grpc as pb_grpc
from mesh.artifacts.signature import ModelSignature
from mesh.identity.ca import Credentials, enroll, init_fleet, load_credentials
from mesh.identity.tls import channel_credentials, secure_channel_options, server_credentials
from mesh.inference.backend import Backend, inspect_model, load_backend
from mesh.inference.runtime import ModelRuntime
from mesh.inference.service import add_to_server
from tests.models import mediapipe_model

# Real models served in these tests (FACTS.md: both runtimes load them).
MEDIAPIPE_NAMES = ("face_detection_short_range", "hand_landmark_lite")


class InferenceFleet:
    """A fleet CA with one node ("node-a", the server) and the admin operator (the client).

    Built from mesh.identity alone, so these tests need nothing from mesh.node.
    """

    def __init__(self, directory) -> None:
        init_fleet(directory, fleet_id="inference-test", force=True)
        self.server: Credentials = enroll(directory, "node-a", force=True)
        self.client: Credentials = load_credentials(directory / "operators" / "admin")


@pytest.fixture(scope="session")
def inference_fleet(tmp_path_factory) -> InferenceFleet:
    return InferenceFleet(tmp_path_factory.mktemp("inference-fleet"))


@pytest.fixture(scope="session")
def backend() -> Backend:
    return load_backend()


@pytest.fixture
def make_runtime(backend):
    """Factory for runtimes (2 workers unless told); all are closed at the end."""
    made: list[ModelRuntime] = []

    def make(**kwargs) -> ModelRuntime:
        kwargs.setdefault("workers", 2)
        runtime = ModelRuntime(backend, **kwargs)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


@pytest_asyncio.fixture
async def serve(inference_fleet):
    """Factory: `stub = await serve(runtime)` serves `runtime` as node-a over mTLS on 127.0.0.1:0 and
    returns an Inference stub whose channel holds the fleet operator's certificate."""
    servers, channels = [], []

    async def start(runtime: ModelRuntime) -> pb_grpc.InferenceStub:
        server = grpc.aio.server()
        add_to_server(server, runtime)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(inference_fleet.server))
        await server.start()
        servers.append(server)
        channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_credentials(inference_fleet.client),
                                          options=secure_channel_options(peer_id="node-a"))
        channels.append(channel)
        return pb_grpc.InferenceStub(channel)

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(None)


def signature_of(path) -> ModelSignature:
    """What a publisher would have put in the manifest: the signature read from the file."""
    return inspect_model(path)


def model_input(signature: ModelSignature, seed: int = 0) -> list[np.ndarray]:
    """A deterministic input per tensor (images in [0, 1), int8 audio features over the full range)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in signature.inputs:
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            arrays.append(rng.random(spec.shape).astype(dtype))
        else:
            info = np.iinfo(dtype)
            arrays.append(rng.integers(info.min, info.max, size=spec.shape, endpoint=True, dtype=dtype))
    return arrays


def request_for(signature: ModelSignature, arrays: list[np.ndarray], **fields) -> pb.InferRequest:
    return pb.InferRequest(inputs=[pb.Tensor(name=s.name, dtype=a.dtype.name, shape=list(a.shape),
                                             data=a.tobytes())
                                   for s, a in zip(signature.inputs, arrays, strict=True)], **fields)


def outputs_of(response: pb.InferResponse) -> dict[str, np.ndarray]:
    return {t.name: np.frombuffer(t.data, dtype=np.dtype(t.dtype)).reshape(tuple(t.shape))
            for t in response.outputs}


def mediapipe_paths():
    return [mediapipe_model(name) for name in MEDIAPIPE_NAMES]
