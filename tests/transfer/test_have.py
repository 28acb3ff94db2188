"""GetHave: a node tells a transfer peer which chunks of a version it holds now (issue 10: chunk
progress between transfer peers, not in gossip). Real nodes over loopback with mTLS."""

from __future__ import annotations

import grpc
import pytest

from mesh._proto import transfer_pb2 as pb
from mesh.artifacts.bitfield import Bitfield
from mesh.artifacts.publish import publish
from mesh.identity.signing import KeyRole, load_signing_key
from mesh.node.local import wait_for
from mesh.transfer.service import HAVE_BURST, VERSION_NOT_HELD
from tests.models import mediapipe_model

pytestmark = pytest.mark.asyncio


async def test_a_peer_says_which_chunks_it_holds_refuses_other_versions_and_too_many_asks(cluster, fleet):
    c = await cluster(2)
    await wait_for(c.converged, 10.0, what="convergence")
    origin, asker = c.nodes["node-00"], c.nodes["node-01"]
    publisher = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
    signed = publish(mediapipe_model("hand_landmark_lite"), name="hand", version="1.0", key=publisher,
                     store=origin.store)
    origin.distributor.add_published(signed)
    manifest = signed.manifest
    stub = asker.distributor._dial(origin.address, "node-00")

    async def have(version: str = "1.0", digest: str = manifest.digest) -> pb.HaveReply:
        return await stub.GetHave(pb.HaveRequest(name="hand", version=version,
                                                 manifest_digest=bytes.fromhex(digest)), timeout=5.0)

    reply = await have()
    held = Bitfield.from_bytes(reply.chunk_count, reply.bitfield)
    assert reply.chunk_count == len(manifest.chunks) and held.complete
    for version, digest in (("0.9", manifest.digest), ("1.0", "00" * 32)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await have(version, digest)
        assert refused.value.code() is grpc.StatusCode.NOT_FOUND
        assert refused.value.details().startswith(VERSION_NOT_HELD)
    codes = []
    for _ in range(3 * HAVE_BURST):
        try:
            await have()
            codes.append("ok")
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code().name)
    assert "RESOURCE_EXHAUSTED" in codes, codes
    assert origin.transfer.counters.haves_refused == codes.count("RESOURCE_EXHAUSTED")
    assert origin.transfer.counters.haves_served >= 1 + codes.count("ok")
