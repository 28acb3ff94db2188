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


def publish_hand(fleet, origin, model: str):
    """Publish `model` as hand 1.0 into the origin's store (not yet announced: `add_published` does)."""
    publisher = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
    return publish(mediapipe_model(model), name="hand", version="1.0", key=publisher, store=origin.store)


async def test_a_peer_says_which_chunks_it_holds_refuses_other_versions_and_too_many_asks(cluster, fleet):
    c = await cluster(2)
    await wait_for(c.converged, 10.0, what="convergence")
    origin, asker = c.nodes["node-00"], c.nodes["node-01"]
    signed = publish_hand(fleet, origin, "hand_landmark_lite")
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


@pytest.mark.parametrize("stepped", [True, False])
async def test_a_download_changes_what_a_node_gossips_a_few_times_not_once_per_chunk(cluster, fleet, stepped):
    """Issue 10: chunk progress off the gossip. With stepped holdings a downloading node's gossiped
    holdings change at most 9 times per version (the manifest stored, 7 steps, complete) plus once when
    it first holds it, however many chunks; the older live bitfield changed once per chunk."""
    from mesh.transfer.holdings import STEPS

    c = await cluster(4, transfer={"stepped_holdings": stepped} if not stepped else {})
    await wait_for(c.converged, 10.0, what="convergence")
    origin = c.nodes["node-00"]
    signed = publish_hand(fleet, origin, "hand_landmark_full")
    before = {i: n.distributor.counters.holdings_updates for i, n in c.nodes.items()}
    origin.distributor.add_published(signed)
    await wait_for(lambda: all(n.store.is_complete(signed.manifest) for n in c.nodes.values()), 60.0,
                   what="every node complete")
    chunks = len(signed.manifest.chunks)
    updates = {i: n.distributor.counters.holdings_updates - before[i]
               for i, n in c.nodes.items() if i != "node-00"}
    asked = sum(n.transfer.counters.haves_served for n in c.nodes.values())
    print(f"stepped={stepped}: {chunks} chunks; gossiped holdings changes per downloader {updates}; "
          f"chunk lists served {asked}")
    if stepped:
        assert all(u <= STEPS + 2 for u in updates.values()), updates
    else:
        assert any(u > STEPS + 2 for u in updates.values()), updates  # the comparison can fail


async def test_ten_nodes_fetch_a_release_with_stepped_gossip_in_about_one_origin_copy(cluster, fleet):
    """More downloaders than steps: each node's share of origin chunks is under an eighth of the model,
    so nodes with a few chunks must still be visible (step 1 from the first chunk) and asked for their
    lists, or every node waits for the origin fallback and the origin sends a copy to each."""
    c = await cluster(10, transfer={"upload_rate_bytes_per_s": 1_000_000})
    await wait_for(c.converged, 20.0, what="convergence")
    origin = c.nodes["node-00"]
    signed = publish_hand(fleet, origin, "hand_landmark_full")
    origin.distributor.add_published(signed)
    took = await wait_for(lambda: all(n.store.is_complete(signed.manifest) for n in c.nodes.values()), 50.0,
                          interval_s=0.1, what="every node complete")
    copies = origin.transfer.counters.uploaded_bytes("hand", "1.0") / signed.manifest.size_bytes
    asked = sum(n.transfer.counters.haves_served for n in c.nodes.values())
    print(f"10 nodes complete in {took:.1f}s; origin sent {copies:.2f} copies; chunk lists served {asked}")
    assert copies <= 1.5, copies
    assert asked > 0


async def test_a_mixed_fleet_completes_and_nodes_gossiping_live_bitfields_are_never_asked(cluster, fleet):
    """A node with `stepped_holdings = false` gossips a live bitfield, as nodes from before this do:
    the others read it as exact and never ask it for its chunk list; the release completes everywhere."""
    c = await cluster(1)
    await c.add("node-01", sections={"transfer": {"stepped_holdings": False}})
    await c.add("node-02")
    await c.add("node-03", sections={"transfer": {"stepped_holdings": False}})
    await wait_for(c.converged, 20.0, what="convergence")
    origin = c.nodes["node-00"]
    signed = publish_hand(fleet, origin, "hand_landmark_full")
    origin.distributor.add_published(signed)
    await wait_for(lambda: all(n.store.is_complete(signed.manifest) for n in c.nodes.values()), 60.0,
                   what="every node complete")
    assert c.nodes["node-01"].transfer.counters.haves_served == 0
    assert c.nodes["node-03"].transfer.counters.haves_served == 0
    live = c.nodes["node-01"].distributor.counters.holdings_updates
    stepped = c.nodes["node-02"].distributor.counters.holdings_updates
    assert live > stepped, (live, stepped)  # the live one changed its gossip once per chunk
