"""Sites mode, what a representative's distributor counts of other sites' holdings (issue 10): a
hostile or mistaken in-site announcement (a verified manifest's digest with another chunk count) is
ignored instead of stopping the distributor, and the fallback crosses only once the site's own
progress stalls. The distributor reads a view built here, as a representative's would look."""

from __future__ import annotations

import random

import pytest

from mesh._proto import meta_pb2
from mesh.artifacts.bitfield import Bitfield
from mesh.artifacts.chunking import ChunkParams
from mesh.artifacts.publish import publish
from mesh.artifacts.store import ArtifactStore
from mesh.identity.ca import load_trusted_keys
from mesh.identity.signing import KeyRole, load_signing_key
from mesh.membership.messages import MemberView, State
from mesh.transfer.distributor import HOLDINGS_SECTION, Distributor, TransferSettings
from mesh.transfer.holdings import Holding, encode_holdings
from tests.models import mediapipe_model

pytestmark = pytest.mark.asyncio

FALLBACK_S = 10.0


class _View:
    def __init__(self) -> None:
        self.rows: list[MemberView] = []

    node_id = "a1"

    def members(self) -> list[MemberView]:
        return list(self.rows)

    def member(self, node_id: str) -> MemberView | None:
        return next((m for m in self.rows if m.node_id == node_id), None)

    def live_count(self) -> int:
        return len(self.rows)

    def dissemination_s(self) -> float:
        return 0.5

    def announce(self, node_id: str, site: str, *holdings: Holding) -> None:
        meta = meta_pb2.MemberMeta(sections={HOLDINGS_SECTION: encode_holdings(list(holdings))})
        old = self.member(node_id)
        self.rows = [m for m in self.rows if m.node_id != node_id]
        self.rows.append(MemberView(node_id, f"{node_id}:1", (("site", site),), State.ALIVE, 0, 0.0, None,
                                    (old.meta_version + 1) if old else 1, meta.SerializeToString()))


class _Board:
    meta_limit_bytes = 1400

    def set_meta(self, meta: bytes) -> None:
        self.meta = meta


async def test_a_bad_in_site_announcement_is_ignored_and_the_fallback_waits_for_a_stall(fleet, tmp_path):
    key = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
    signed = publish(mediapipe_model("hand_landmark_lite"), name="hand", version="1.0", key=key,
                     store=ArtifactStore(tmp_path / "origin"), params=ChunkParams(avg_size_bytes=64 * 1024))
    n = len(signed.manifest.chunks)
    digest = signed.digest
    clock = [100.0]
    view = _View()
    distributor = Distributor(
        node_id="a1", site="amsterdam", store=ArtifactStore(tmp_path / "store"),
        trusted=load_trusted_keys(fleet.node_credentials("a1").directory), view=view, board=_Board(),
        dial=lambda address, peer_id: None, settings=TransferSettings(cross_fallback_s=FALLBACK_S),
        rng=random.Random(1), now=lambda: clock[0], crosses=lambda name, version: False)
    distributor._checked[("hand", "1.0", digest)] = signed  # verified, as its check task would leave it

    def counted_abroad() -> bool:
        return any(m.node_id == "b1" and hs for m, hs in distributor._peer_holdings())

    view.announce("b1", "berlin", Holding("hand", "1.0", digest, Bitfield.full(n)))
    view.announce("a2", "amsterdam", Holding("hand", "1.0", digest, Bitfield(n, [0])))
    # Another member of this site announces the verified digest with another chunk count, and complete:
    # the bitfields cannot be combined. It must neither stop the distributor nor count as the site's.
    view.announce("a3", "amsterdam", Holding("hand", "1.0", digest, Bitfield.full(n + 5)))
    assert not counted_abroad()  # the site is fetching it (a2): wait
    clock[0] += FALLBACK_S / 2
    view.announce("a2", "amsterdam", Holding("hand", "1.0", digest, Bitfield(n, [0, 1])))
    assert not counted_abroad()  # and it grows
    clock[0] += FALLBACK_S - 1
    assert not counted_abroad()  # the growth restarted the wait
    clock[0] += 2
    assert counted_abroad()  # stalled for the whole fallback, berlin has more: cross
    # Were a3's complete claim counted, the site would look complete and nobody would ever cross.


async def test_chunks_from_this_site_hold_off_the_fallback_while_stepped_gossip_is_still(fleet, tmp_path):
    """Stepped holdings show a site's progress an eighth at a time; a chunk this node receives from a
    member of its site is progress too, so the fallback waits for a real stall (and, without such a
    chunk, it does cross after `cross_fallback_s`)."""
    from mesh.transfer.holdings import step_of

    key = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
    signed = publish(mediapipe_model("hand_landmark_lite"), name="hand", version="1.0", key=key,
                     store=ArtifactStore(tmp_path / "origin"), params=ChunkParams(avg_size_bytes=64 * 1024))
    n, digest = len(signed.manifest.chunks), signed.digest

    def representative(name: str) -> tuple[Distributor, _View, list[float]]:
        clock, view = [100.0], _View()
        distributor = Distributor(
            node_id="a1", site="amsterdam", store=ArtifactStore(tmp_path / name),
            trusted=load_trusted_keys(fleet.node_credentials("a1").directory), view=view, board=_Board(),
            dial=lambda address, peer_id: None, settings=TransferSettings(cross_fallback_s=FALLBACK_S),
            rng=random.Random(1), now=lambda: clock[0], crosses=lambda name, version: False)
        distributor._checked[("hand", "1.0", digest)] = signed
        view.announce("b1", "berlin", Holding("hand", "1.0", digest, Bitfield.full(n), progress=8))
        snapshot = Bitfield(n, [0])
        view.announce("a2", "amsterdam", Holding("hand", "1.0", digest, snapshot, progress=step_of(snapshot)))
        return distributor, view, clock

    for chunks_arrive in (True, False):
        distributor, view, clock = representative(f"store-{chunks_arrive}")

        def counted_abroad(distributor: Distributor = distributor) -> bool:
            return any(m.node_id == "b1" and hs for m, hs in distributor._peer_holdings())

        assert not counted_abroad()  # a2 is fetching it: wait
        clock[0] += FALLBACK_S - 1
        if chunks_arrive:
            distributor._site_made_progress(signed.manifest, "a2")  # a chunk from a2 landed here
        clock[0] += 2
        assert counted_abroad() is not chunks_arrive
        clock[0] += FALLBACK_S
        assert counted_abroad()  # no chunk since: a stall, cross
