"""What a node holds, as published in its membership metadata.

Each entry says "I have (some of) model NAME version VERSION, whose signed
manifest has digest D, and these are the chunks I hold" with one bit per
chunk. Peers read it to decide whom to ask for which chunk; the announcement
of a new version is simply the first node (the origin) holding it.

Pure codec: protobuf bytes <-> `Holding`s, validated, since metadata comes from
peers and a bad blob must not take the reader down.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from mesh._proto import transfer_pb2 as pb
from mesh.artifacts.bitfield import Bitfield, BitfieldError
from mesh.artifacts.manifest import ArtifactError, check_name

DIGEST_BYTES = 32


class HoldingsError(ValueError):
    """A peer's holdings metadata cannot be decoded; the text says which entry and why."""


@dataclass(frozen=True)
class Holding:
    name: str
    version: str
    manifest_digest: str  # hex sha256 of the signed manifest document
    have: Bitfield
    origin: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.version

    @property
    def complete(self) -> bool:
        return self.have.complete


def encode_holdings(holdings: list[Holding]) -> bytes:
    return pb.Holdings(models=[
        pb.Holding(name=h.name, version=h.version, manifest_digest=bytes.fromhex(h.manifest_digest),
                   chunk_count=len(h.have), bitfield=h.have.to_bytes(), origin=h.origin)
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
        except (ArtifactError, BitfieldError) as exc:
            raise HoldingsError(f"entry {i}: {exc}") from None
        out.append(Holding(m.name, m.version, m.manifest_digest.hex(), have, m.origin))
    return out
