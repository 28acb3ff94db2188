"""The holdings codec (pure): what a node gossips of the versions it holds, and progress in steps."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh._proto import transfer_pb2 as pb
from mesh.artifacts.bitfield import Bitfield
from mesh.transfer.holdings import (
    STEPS,
    Holding,
    HoldingsError,
    decode_holdings,
    encode_holdings,
    gossip_view,
    step_of,
)

DIGEST = "ab" * 32


def bits(n: int, present) -> Bitfield:
    b = Bitfield(n)
    for i in present:
        b.set(i)
    return b


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), data=st.data(), origin=st.booleans(), stepped=st.booleans())
def test_holdings_round_trip(n, data, origin, stepped) -> None:
    present = data.draw(st.sets(st.integers(0, n - 1)))
    live = Holding("hand", "1.0", DIGEST, bits(n, present), origin)
    holding = gossip_view(live, None) if stepped else live
    (back,) = decode_holdings(encode_holdings([holding]))
    assert back == holding
    assert back.complete == (len(present) == n)


def test_a_holding_from_an_older_node_is_live_and_a_stepped_one_still_reads_as_a_bitfield() -> None:
    legacy = encode_holdings([Holding("hand", "1.0", DIGEST, bits(4, [0, 2]))])
    (h,) = decode_holdings(legacy)
    assert h.progress is None and not h.complete and list(h.have.present()) == [0, 2]
    stepped = encode_holdings([gossip_view(Holding("hand", "1.0", DIGEST, bits(16, range(5))), None)])
    message = pb.Holdings.FromString(stepped).models[0]  # what an older node's decoder reads
    assert Bitfield.from_bytes(message.chunk_count, message.bitfield).count() == 5
    assert message.progress_eighths == 2


@pytest.mark.parametrize(("progress", "held", "n"), [(9, 16, 16), (8, 15, 16), (7, 16, 16), (0, 16, 16)])
def test_a_progress_that_its_snapshot_does_not_bear_out_is_refused(progress, held, n) -> None:
    """Only what any rule of steps keeps true is checked (0..8, and 8 exactly when whole), so nodes
    with another rounding stay readable."""
    message = pb.Holding(name="hand", version="1.0", manifest_digest=bytes.fromhex(DIGEST), chunk_count=n,
                         bitfield=bits(n, range(held)).to_bytes(), progress_eighths=progress)
    with pytest.raises(HoldingsError, match="entry 0: progress"):
        decode_holdings(pb.Holdings(models=[message]).SerializeToString())


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 2000), seed=st.integers(0, 2**32))
def test_a_download_changes_what_is_gossiped_at_most_steps_plus_one_times(n, seed) -> None:
    """Whatever the number of chunks and the order they arrive in: the manifest stored (nothing held),
    then one change per step at most, the last at complete."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    have = Bitfield(n)
    announced = gossip_view(Holding("hand", "1.0", DIGEST, have.copy()), None)
    blobs = [encode_holdings([announced])]
    for i in order:
        have.set(i)
        announced = gossip_view(Holding("hand", "1.0", DIGEST, have.copy()), announced)
        blob = encode_holdings([announced])
        if blob != blobs[-1]:
            blobs.append(blob)
    assert len(blobs) <= STEPS + 1
    (last,) = decode_holdings(blobs[-1])
    assert last.complete and last.progress == STEPS


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 2000), seed=st.integers(0, 2**32))
def test_a_snapshot_never_claims_a_chunk_not_held_and_one_chunk_is_step_one(n, seed) -> None:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    have = Bitfield(n)
    announced = gossip_view(Holding("hand", "1.0", DIGEST, have.copy()), None)
    assert announced.progress == 0
    for k, i in enumerate(order, start=1):
        have.set(i)
        announced = gossip_view(Holding("hand", "1.0", DIGEST, have.copy()), announced)
        assert not (announced.have - have).count()  # a subset of what is held now
        assert announced.progress == step_of(announced.have) >= 1
        if k < n:
            assert announced.progress < STEPS
