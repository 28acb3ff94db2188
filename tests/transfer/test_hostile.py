"""A fleet node with a valid certificate and hostile intent, against real nodes on loopback: what its
announcements can make the others do is bounded (issue: unverifiable higher versions delayed a
genuine release for as long as they stood)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from mesh.artifacts.manifest import SignedManifest
from mesh.artifacts.publish import publish
from mesh.artifacts.store import ArtifactStore
from mesh.identity.signing import KeyRole, SigningKey, load_signing_key
from mesh.node.local import wait_for
from tests.models import mediapipe_model

pytestmark = pytest.mark.asyncio


def plant(node, signed: SignedManifest) -> None:
    """Put a manifest into a node's store as a hostile operator of that device would."""
    manifest = signed.manifest
    path = node.store.manifest_path(manifest.name, manifest.version)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(signed.to_json())


async def test_unverifiable_higher_versions_do_not_delay_a_genuine_release(cluster, fleet, tmp_path):
    c = await cluster(6)
    await wait_for(c.converged, 10.0, what="convergence")
    origin, hostile = c.nodes["node-00"], c.nodes["node-05"]
    honest = [n for i, n in c.nodes.items() if i != "node-05"]
    publisher = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
    operator = load_signing_key(fleet.directory / "operator.key", KeyRole.OPERATOR)
    stranger = SigningKey.generate(KeyRole.PUBLISHER)
    model = mediapipe_model("face_detection_short_range")
    template = publish(model, name="face", version="1.0", key=publisher,
                       store=ArtifactStore(tmp_path / "publisher")).manifest

    # The hostile node announces 9.0, 9.1 and 9.2: signed with the operator key, with a key the fleet
    # does not know, and with a signature that is not one.
    for version, key in (("9.0", operator), ("9.1", stranger), ("9.2", None)):
        forged = dataclasses.replace(template, version=version,
                                     publisher_key_id=(key or publisher).key_id)
        signature = key.sign(forged.canonical_bytes()) if key else b"\x01" * 64
        plant(hostile, SignedManifest(forged, signature))
    hostile.distributor.poke()
    await wait_for(lambda: all(any(r["phase"] == "refused" and r["version"].startswith("9.")
                                   for r in n.distributor.model_status()) for n in honest[1:]),
                   20.0, what="every honest node refuses what the hostile node announces")

    # The genuine 2.0, published at the origin while those announcements stand.
    started = time.monotonic()
    genuine = publish(model, name="face", version="2.0", key=publisher, store=origin.store)
    origin.distributor.add_published(genuine)
    await wait_for(lambda: all(n.store.is_complete(genuine.manifest) for n in honest), 20.0,
                   what="every honest node completes the genuine 2.0")
    elapsed_s = time.monotonic() - started

    for node in honest[1:]:
        rows = {r["version"]: r for r in node.distributor.model_status() if r["name"] == "face"}
        refused = [v for v in ("9.0", "9.1", "9.2") if rows.get(v, {}).get("phase") == "refused"]
        assert refused, rows
        assert all("announced by node-05" in rows[v]["error"] for v in refused)
        assert not any(node.store.is_complete(dataclasses.replace(template, version=v))
                       for v in ("9.0", "9.1", "9.2"))
    # Each honest node asked the hostile node for at most one manifest per version before ignoring it.
    assert hostile.transfer.counters.manifests_served <= 3 * (len(honest) - 1)
    assert hostile.transfer.counters.chunks_served == 0
    print(f"genuine 2.0 on every honest node after {elapsed_s:.2f}s with hostile announcements standing")


async def holder_of_a_release(cluster, fleet, **cluster_kw):
    """Two nodes: node-00 publishes hand 1.0 and node-01 fetches it all; (cluster, signed, node-01)."""
    c = await cluster(2, **cluster_kw)
    await wait_for(c.converged, 10.0, what="convergence")
    origin, holder = c.nodes["node-00"], c.nodes["node-01"]
    publisher = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
    signed = publish(mediapipe_model("hand_landmark_lite"), name="hand", version="1.0", key=publisher,
                     store=origin.store)
    origin.distributor.add_published(signed)
    await wait_for(lambda: holder.store.is_complete(signed.manifest), 30.0, what="node-01 completes")
    return c, signed, holder


async def test_a_node_announcing_chunks_it_never_serves_is_banned_and_the_release_completes(cluster, fleet):
    """A node announces a complete version and answers every chunk request with NOT_FOUND. It was the
    only peer holding the version besides the origin, so its claims kept every chunk "available" and
    a newcomer never asked the origin: the download never ended. Now each denial drops that claim,
    three of them ban the node for the download (counted as `false_claim`), and the chunks come from
    the origin."""
    c, signed, liar = await holder_of_a_release(cluster, fleet)
    liar.transfer.faults.deny_chunks = True  # it keeps announcing the version, and serves none of it
    newcomer = await c.add("node-02")
    took = await wait_for(lambda: newcomer.store.is_complete(signed.manifest), 60.0,
                          what="the newcomer completes despite the liar")
    counters = newcomer.distributor.counters
    assert counters.bans["false_claim"] == 1, counters
    assert counters.bytes_from_origin == signed.manifest.size_bytes, counters
    print(f"newcomer complete in {took:.1f}s; the liar banned after denying chunks")


async def test_a_node_announcing_chunks_and_refusing_every_request_as_busy_does_not_stall_a_download(
        cluster, fleet):
    """As above, but the node answers every chunk request with RESOURCE_EXHAUSTED (no upload slot), the
    answer an honest busy peer gives: it kept its claims, and a newcomer whose only other peer it was
    never asked the origin. Now its claims are set aside after 8 refusals in a row over 15 s with nothing
    else moving (counted as `benched`, no ban), and the chunks come from the origin: those the origin
    rendezvous gives the newcomer at once, those it gives the refuser once its refusals have lasted
    `origin_fallback_s` (10 s here; 60 by default)."""
    c, signed, refuser = await holder_of_a_release(cluster, fleet, transfer={"origin_fallback_s": 10.0})
    refuser.transfer.faults.refuse_chunks = True
    newcomer = await c.add("node-02")
    took = await wait_for(lambda: newcomer.store.is_complete(signed.manifest), 120.0,
                          what="the newcomer completes despite the refuser")
    counters = newcomer.distributor.counters
    assert counters.benched >= 1, counters
    assert counters.bans == {"hash_mismatch": 0, "protocol": 0, "false_claim": 0}, counters
    assert counters.bytes_from_origin == signed.manifest.size_bytes, counters
    assert refuser.transfer.counters.refused_busy >= 8
    print(f"newcomer complete in {took:.1f}s; the refuser's claims set aside {counters.benched} time(s)")


async def test_a_node_that_collected_the_version_is_not_taken_for_a_liar(cluster, fleet):
    """The honest twin of the test above: a node that no longer holds the version (it collected it, and
    its gossip has not said so yet) answers 'version not held'; the asker drops its claims without
    counting them as lies, so no alert names an honest node, and the release completes."""
    c, signed, collector = await holder_of_a_release(cluster, fleet)
    origin = c.nodes["node-00"]
    collector.transfer.faults.forget_versions = True  # as if collected, still announced
    newcomer = await c.add("node-02")
    await wait_for(lambda: newcomer.store.is_complete(signed.manifest), 60.0, what="the newcomer completes")
    counters = newcomer.distributor.counters
    assert counters.bans == {"hash_mismatch": 0, "protocol": 0, "false_claim": 0}, counters
    assert counters.bytes_from_origin == signed.manifest.size_bytes, counters
    # Without the fault: a version a node never held (or collected) is answered the same way.
    import grpc

    from mesh._proto import transfer_pb2 as pb
    from mesh.transfer.service import VERSION_NOT_HELD

    call = newcomer.distributor._dial(origin.address, "node-00").FetchChunk(
        pb.ChunkRequest(name="hand", version="0.9", index=0))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in call:
            pass
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    assert refused.value.details().startswith(VERSION_NOT_HELD), refused.value.details()


@pytest.mark.parametrize("code, details, reason", [
    ("NOT_FOUND", "chunk 3 of hand 1.0 is not held here", "NOT_HELD"),
    ("NOT_FOUND", "version not held here: hand 1.0", "WITHDRAWN"),
    ("RESOURCE_EXHAUSTED", "all 4 upload slots are busy; ask another peer", "BUSY"),
    ("RESOURCE_EXHAUSTED", "Received message larger than max (5000000 vs. 4194304)", "ERROR"),
    ("INTERNAL", "chunk 3 is unreadable here", "ERROR"),
    ("INVALID_ARGUMENT", "hand 1.0 has chunks 0..17, not 40", "ERROR"),
    ("UNAVAILABLE", "failed to connect to all addresses", "UNAVAILABLE"),
    ("DEADLINE_EXCEEDED", "Deadline Exceeded", "UNAVAILABLE"),
    (None, "connection reset", "UNAVAILABLE"),
])
async def test_what_a_failed_chunk_request_tells_the_scheduler(code, details, reason) -> None:
    """A peer's answer (busy, an error of its own) counts against it at once; no answer at all (we could
    not reach it) only while others answer this node: the scheduler needs to tell them apart."""
    import grpc

    from mesh.transfer.distributor import failure_of
    from mesh.transfer.scheduler import FailureReason

    assert failure_of(grpc.StatusCode[code] if code else None, details) is FailureReason[reason]
