"""Low-priority downloads (a rollout's target prefetched outside this device's wave): a background version
asks for no chunk while a download of anything else runs, then finishes. A real origin node serves both
over gRPC with mTLS; the downloading distributor is built here, with what a node would hand it."""

from __future__ import annotations

import asyncio
import random

import pytest

from mesh._proto import transfer_pb2_grpc
from mesh.artifacts.chunking import ChunkParams
from mesh.artifacts.publish import publish
from mesh.artifacts.store import ArtifactStore
from mesh.identity.ca import load_trusted_keys
from mesh.identity.signing import KeyRole, load_signing_key
from mesh.node.local import wait_for
from mesh.node.peers import PeerChannels
from mesh.transfer.distributor import Distributor, Phase, TransferSettings
from tests.models import mediapipe_model

pytestmark = pytest.mark.asyncio

IN_FLIGHT = 2  # per peer
HOLDERS = 2  # the origin and node-01: the most requests in flight at any time is IN_FLIGHT * HOLDERS


def _chunks(distributor: Distributor, key: tuple[str, str]) -> int:
    progress = distributor.progress.get(key)
    return 0 if progress is None else progress.have_chunks


class _Board:
    """Where the distributor would announce its own holdings (nobody fetches from it here)."""

    meta_limit_bytes = 1400

    def set_meta(self, meta: bytes) -> None:
        self.meta = meta


@pytest.mark.parametrize("low_priority", [True, False], ids=["background", "control"])
async def test_a_background_download_waits_while_another_download_runs(
    cluster, fleet, tmp_path, low_priority
):
    c = await cluster(3)
    await wait_for(c.converged, 10.0, what="convergence")
    origin, neighbour = c.nodes["node-00"], c.nodes["node-02"]
    key = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
    small = ChunkParams(avg_size_bytes=32 * 1024)
    models = (("palm_detection_lite", "palm", "2.0"), ("hand_landmark_lite", "hand", "1.0"))
    signed = [
        publish(mediapipe_model(path), name=name, version=version, key=key, store=origin.store, params=small)
        for path, name, version in models
    ]
    for s in signed:
        origin.distributor.add_published(s)
    later, now = (s.manifest for s in signed)
    # The distributor below reads node-02's view and fetches as node-02 would, from the origin and node-01
    # (the origin refuses a chunk it already sent and points the asker to the peers that hold it).
    await wait_for(lambda: all(n.store.is_complete(m) for n in c.nodes.values() for m in (later, now)), 60.0,
                   what="both versions on every node")

    channels = PeerChannels(fleet.node_credentials("node-02"))
    background = {("palm", "2.0")} if low_priority else set()
    loop = asyncio.get_running_loop()
    distributor = Distributor(
        node_id="node-02", site="site-0", store=ArtifactStore(tmp_path / "store"),
        trusted=load_trusted_keys(fleet.node_credentials("node-02").directory),
        view=neighbour.membership, board=_Board(),
        dial=lambda address, peer_id: transfer_pb2_grpc.TransferStub(channels.channel(address, peer_id)),
        settings=TransferSettings(max_in_flight_per_peer=IN_FLIGHT, download_rate_bytes_per_s=1_000_000,
                                  fetch_all=False),
        rng=random.Random(7), now=loop.time, background=lambda: background)
    distributor.start()
    try:
        prefetch = distributor.fetch("palm", "2.0")
        await wait_for(lambda: _chunks(distributor, ("palm", "2.0")) >= 3, 30.0, interval_s=0.005,
                       what="the prefetch under way")
        before = distributor.progress[("palm", "2.0")].have_chunks
        assert before < len(later.chunks) - 2 * IN_FLIGHT * HOLDERS, "the prefetch ended too soon to measure"
        await distributor.fetch("hand", "1.0")
        assert distributor.progress[("hand", "1.0")].phase is Phase.COMPLETE
        during = distributor.progress[("palm", "2.0")].have_chunks - before
        await asyncio.wait_for(prefetch, 60.0)
        assert distributor.progress[("palm", "2.0")].phase is Phase.COMPLETE
        assert distributor.store.verify_model(later) and distributor.store.verify_model(now)
    finally:
        await distributor.stop()
        await channels.close()
    priority = "background" if low_priority else "normal priority"
    print(f"{during} chunks of palm 2.0 ({priority}) arrived while hand 1.0 downloaded; at most "
          f"{IN_FLIGHT * HOLDERS} were in flight")
    if low_priority:
        # Only the requests already in flight when the other download began may land meanwhile.
        assert during <= IN_FLIGHT * HOLDERS, f"{during} chunks of the background version arrived meanwhile"
    else:
        # The control: at normal priority the two share the link, so the check above could fail.
        assert during > IN_FLIGHT * HOLDERS, f"only {during} chunks of the control arrived meanwhile"
