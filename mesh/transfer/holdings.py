"""What a node holds, as published in its membership metadata.

Each entry says "I have (some of) model NAME version VERSION, whose signed
manifest has digest D, and these are the chunks I hold" with one bit per
chunk. Peers read it to decide whom to ask for which chunk; the announcement
of a new version is simply the first node (the origin) holding it.

Pure codec: protobuf bytes <-> `Holding`s, validated, since metadata comes from
peers and a bad blob must not take the reader down.

Progress in steps (`progress`, eighths of the chunks held, 8 = complete): a
downloading node's holding changes in gossip at most 9 times per version
(`gossip_view`), not once per chunk; its bitfield is then a snapshot from when
the step last changed. A holding without `progress` (older nodes) is live.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from mesh._proto import transfer_pb2 as pb
from mesh.artifacts.bitfield import Bitfield, BitfieldError
from mesh.artifacts.manifest import ArtifactError, check_name

DIGEST_BYTES = 32
STEPS = 8  # progress is announced in eighths


class HoldingsError(ValueError):
    """A peer's holdings metadata cannot be decoded; the text says which entry and why."""


@dataclass(frozen=True)
class Holding:
    name: str
    version: str
    manifest_digest: str  # hex sha256 of the signed manifest document
    have: Bitfield
    origin: bool = False
    progress: int | None = None  # eighths held, as announced in steps; None: `have` is live

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.version

    @property
    def complete(self) -> bool:
        return self.progress == STEPS if self.progress is not None else self.have.complete


def step_of(have: Bitfield) -> int:
    """The progress step of a bitfield: eighths of its chunks held, rounded down, but 1 from the first
    chunk (0 means none: a node with a few chunks is asked for them, not taken for one with nothing)
    and 8 only when whole."""
    if have.complete:
        return STEPS
    count = have.count()
    return 0 if count == 0 else max(1, STEPS * count // len(have))


def gossip_view(live: Holding, previous: Holding | None) -> Holding:
    """What to announce of `live` (this node's own holding): `previous` (what is announced now) while the
    step is the same, else a snapshot at the new step. So a version's holding changes in gossip at most
    STEPS + 1 times while it downloads, whatever its number of chunks."""
    step = step_of(live.have)
    if previous is not None and previous.progress == step and (
            previous.key, previous.manifest_digest, previous.origin, len(previous.have)) == (
            live.key, live.manifest_digest, live.origin, len(live.have)):
        return previous
    return Holding(live.name, live.version, live.manifest_digest, live.have.copy(), live.origin, step)


def encode_holdings(holdings: list[Holding]) -> bytes:
    return pb.Holdings(models=[
        pb.Holding(name=h.name, version=h.version, manifest_digest=bytes.fromhex(h.manifest_digest),
                   chunk_count=len(h.have), bitfield=h.have.to_bytes(), origin=h.origin,
                   progress_eighths=h.progress)
        for h in holdings]).SerializeToString()


def decode_holdings(data: bytes) -> list[Holding]:
    if not data:
        return []
    try:
        message = pb.Holdings.FromString(data)
    except DecodeError as exc:
        raise HoldingsError(f"holdings metadata is not a Holdings message: {exc}") from None
    out = []
    for i, m in enumerate(message.models):
        try:
            check_name(m.name, "model name")
            check_name(m.version, "model version")
            if len(m.manifest_digest) != DIGEST_BYTES:
                raise HoldingsError(f"entry {i}: manifest digest is {len(m.manifest_digest)} bytes, "
                                    f"expected {DIGEST_BYTES}")
            have = Bitfield.from_bytes(m.chunk_count, m.bitfield)
            progress = m.progress_eighths if m.HasField("progress_eighths") else None
            # Only what any rounding keeps true (so another rule of steps stays readable): 0..8, and 8
            # exactly when the snapshot is whole.
            if progress is not None and (progress > STEPS or (progress == STEPS) != have.complete):
                raise HoldingsError(f"entry {i}: progress {progress}/{STEPS} does not match its snapshot of "
                                    f"{have.count()} of {len(have)} chunks")
        except (ArtifactError, BitfieldError) as exc:
            raise HoldingsError(f"entry {i}: {exc}") from None
        out.append(Holding(m.name, m.version, m.manifest_digest.hex(), have, m.origin, progress))
    return out
