"""The Transfer gRPC service: serves signed manifests and verified chunks to
fleet peers, within this node's upload caps.

Thin shell over the artifact store: every byte served comes from
`ArtifactStore.read_chunk`, which re-verifies the chunk's hash, so a node
never passes on bytes that rotted on its disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from mesh._proto import transfer_pb2 as pb
from mesh._proto import transfer_pb2_grpc as pb_grpc
from mesh.artifacts.bitfield import Bitfield
from mesh.artifacts.manifest import ArtifactError, check_name
from mesh.artifacts.store import ArtifactStore, BadChunkError, MissingChunkError
from mesh.identity.ca import Role
from mesh.identity.tls import peer_identity
from mesh.transfer.pacing import Pacer
from mesh.transfer.ratelimit import TokenBucket

log = logging.getLogger("mesh.transfer")

# Pieces of a chunk per stream message. Each message costs Python time on both
# ends (profiled: it dominated 30 in-process nodes at 64 KiB); 256 KiB keeps an
# average chunk to one or two messages while the upload cap still paces it.
PIECE_BYTES = 256 * 1024


@dataclass
class UploadCounters:
    """What this node served, for metrics and for tests that count origin egress."""

    bytes_served: int = 0
    bytes_served_as_origin: int = 0  # of bytes_served, those of versions this node originated
    chunks_served: int = 0
    bytes_by_version: dict[tuple[str, str], int] = field(default_factory=dict)
    manifests_served: int = 0
    refused_busy: int = 0
    haves_served: int = 0  # GetHave answered
    haves_refused: int = 0  # GetHave refused: asked too often

    def uploaded_bytes(self, name: str, version: str) -> int:
        """Bytes of name/version this node has served."""
        return self.bytes_by_version.get((name, version), 0)


# GetHave: asks per asker a second (and burst); askers remembered at most.
HAVE_ASKS_PER_S = 4.0
HAVE_BURST = 8
MAX_HAVE_ASKERS = 4096

# FetchChunk's NOT_FOUND details when this node holds no version of that name and number (it collected
# it, or never had it): the asker drops every claim this node made to it, without counting it as a lie.
# Nodes from before this said "no manifest for NAME VERSION on this node" (VERSION_NOT_HELD_BEFORE),
# which askers read the same way, so an upgraded downloader does not take an older node for a liar.
VERSION_NOT_HELD = "version not held here"
VERSION_NOT_HELD_BEFORE = "no manifest for "


class ServeFaults:
    """Test-only misbehaviour: serve corrupted chunk bytes, deny holding the chunks this node announces,
    or refuse every chunk as busy (bad peers)."""

    def __init__(self) -> None:
        self.corrupt_chunks = False
        self.deny_chunks = False
        self.forget_versions = False  # answer as a node that collected every version
        self.refuse_chunks = False  # every upload slot "busy", for good


class OriginPolicy:
    """How the origin keeps its egress near one copy of each version.

    Peers already ask the origin only for chunks no peer holds, one node per
    chunk (the scheduler's rendezvous). But peers that learn of a release at the
    same moment do not yet know each other, each may think itself the one, and
    under load the news that a peer got a chunk travels slowly. So once the
    origin has sent (or is sending) a chunk, it refuses that chunk to each other
    requester `max_refusals` times with RESOURCE_EXHAUSTED ("fetch it from a
    peer"). A refused node backs off (0.25 s, doubling) and meanwhile learns who
    holds the chunk. A node that keeps asking has no peer to get it from (the
    receiver died, or the node banned every holder) and is then served: no
    count of refusals can starve a node, and no clock decides it.
    """

    def __init__(self, *, is_origin: Callable[[str, str], bool], max_refusals: int = 4) -> None:
        self.is_origin = is_origin
        self.max_refusals = max_refusals
        self._given: set[tuple[str, str, int]] = set()
        self._refusals: dict[tuple[str, str, int, str], int] = {}

    def refuse(self, name: str, version: str, index: int, requester: str) -> str | None:
        if not self.is_origin(name, version):
            return None
        key = (name, version, index)
        if key not in self._given:
            return None
        count = self._refusals.get((*key, requester), 0)
        if count >= self.max_refusals:
            return None
        self._refusals[(*key, requester)] = count + 1
        return (f"the origin already sent chunk {index} of {name} {version} into the swarm; "
                "fetch it from peers")

    def started(self, name: str, version: str, index: int) -> None:
        if self.is_origin(name, version):
            self._given.add((name, version, index))

    def forget(self, name: str, version: str) -> None:
        """The version was garbage-collected: drop what was counted for it."""
        self._given = {key for key in self._given if key[:2] != (name, version)}
        self._refusals = {key: n for key, n in self._refusals.items() if key[:2] != (name, version)}

    def tracked(self) -> set[tuple[str, str]]:
        """The versions (name, version) this policy holds counts for."""
        return {key[:2] for key in self._given} | {key[:2] for key in self._refusals}


class TransferServicer(pb_grpc.TransferServicer):
    def __init__(self, store: ArtifactStore, *, max_uploads: int, upload: Pacer, origin: OriginPolicy,
                 faults: ServeFaults | None = None, clock: Callable[[], float] = time.monotonic,
                 have_source: Callable[[str, str, str], Bitfield | None] | None = None) -> None:
        self.origin = origin
        self._store = store
        self._slots = asyncio.Semaphore(max_uploads)
        self._max_uploads = max_uploads
        self._busy = 0
        self._upload = upload
        self.faults = faults or ServeFaults()
        self.counters = UploadCounters()
        self._clock = clock
        # GetHave: what this node holds of a version now (the distributor's live bitfield), and a budget
        # of asks per asker.
        self._have_source = have_source
        self._have_budgets: dict[str, TokenBucket] = {}

    async def _require_node(self, context: grpc.aio.ServicerContext) -> str:
        peer = peer_identity(context)
        if peer is None or peer.role is not Role.NODE:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "transfer calls need a fleet node certificate")
            raise AssertionError("grpc's context.abort returned")  # it raises; this tells type checkers
        return peer.name

    async def _names(self, request, context) -> tuple[str, str]:
        try:
            return check_name(request.name, "model name"), check_name(request.version, "model version")
        except ArtifactError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            # It raises; this tells type checkers.
            raise AssertionError("grpc's context.abort returned") from None

    async def _manifest(self, name: str, version: str, context):
        try:
            return self._store.load_manifest(name, version)
        except FileNotFoundError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no manifest for {name} {version} on this node")
        except (ArtifactError, OSError) as exc:
            log.error("cannot read manifest %s %s: %s", name, version, exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"manifest for {name} {version} is unreadable here")

    async def GetHave(self, request: pb.HaveRequest, context) -> pb.HaveReply:
        peer = await self._require_node(context)
        name, version = await self._names(request, context)
        now = self._clock()
        budget = self._have_budgets.get(peer)
        if budget is None:
            if len(self._have_budgets) >= MAX_HAVE_ASKERS:  # forget the askers whose budget is full again
                self._have_budgets = {
                    p: b for p, b in self._have_budgets.items() if b.available(now) < HAVE_BURST
                }
            budget = self._have_budgets[peer] = TokenBucket(HAVE_ASKS_PER_S, HAVE_BURST, now)
        if budget.available(now) < 1:
            self.counters.haves_refused += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"asked for chunk lists more than {HAVE_ASKS_PER_S:g} times a second; "
                                "ask less often")
        budget.reserve(1, now)
        have = self._have_source(name, version, request.manifest_digest.hex()) if self._have_source else None
        if have is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{VERSION_NOT_HELD}: {name} {version}")
            raise AssertionError("grpc's context.abort returned")
        self.counters.haves_served += 1
        return pb.HaveReply(chunk_count=len(have), bitfield=have.to_bytes())

    def _not_held(self, name: str, version: str, chunk_missing: str) -> str:
        """NOT_FOUND details for a chunk this node lacks: VERSION_NOT_HELD when the whole version went
        (collected while the request ran), else `chunk_missing`."""
        try:
            gone = not self._store.manifest_path(name, version).exists()
        except (ArtifactError, OSError):
            gone = False
        return f"{VERSION_NOT_HELD}: {name} {version}" if gone else chunk_missing

    async def GetManifest(self, request: pb.ManifestRequest, context) -> pb.ManifestReply:
        await self._require_node(context)
        name, version = await self._names(request, context)
        signed = await self._manifest(name, version, context)
        self.counters.manifests_served += 1
        return pb.ManifestReply(signed_manifest=signed.to_json())

    async def FetchChunk(self, request: pb.ChunkRequest, context):
        peer = await self._require_node(context)
        name, version = await self._names(request, context)
        if self.faults.forget_versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{VERSION_NOT_HELD}: {name} {version}")
        try:
            manifest = self._store.load_manifest(name, version).manifest
        except FileNotFoundError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{VERSION_NOT_HELD}: {name} {version}")
            raise AssertionError("grpc's context.abort returned") from None
        except (ArtifactError, OSError) as exc:
            log.error("cannot read manifest %s %s: %s", name, version, exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"manifest for {name} {version} is unreadable here")
            raise AssertionError("grpc's context.abort returned") from None
        if request.index >= len(manifest.chunks):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{name} {version} has chunks 0..{len(manifest.chunks) - 1}, "
                                f"not {request.index}")
        ref = manifest.chunks[request.index]
        if self.faults.deny_chunks or not self._store.has_chunk(ref.sha256):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                self._not_held(name, version, f"chunk {request.index} of {name} {version} is "
                                               "not held here"))
        if self.faults.refuse_chunks:
            self.counters.refused_busy += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"all {self._max_uploads} upload slots are busy; ask another peer")
        refusal = self.origin.refuse(name, version, request.index, peer)
        if refusal:
            self.counters.refused_busy += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        if self._busy >= self._max_uploads:
            self.counters.refused_busy += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"all {self._max_uploads} upload slots are busy; ask another peer")
        async with self._slots:
            self._busy += 1
            as_origin = self.origin.is_origin(name, version)
            try:
                try:
                    data = await asyncio.to_thread(self._store.read_chunk, ref.sha256)
                except (BadChunkError, MissingChunkError) as exc:  # rotted, or collected since has_chunk
                    log.warning("not serving chunk %d of %s %s: %s", request.index, name, version, exc)
                    await context.abort(grpc.StatusCode.NOT_FOUND,
                                        self._not_held(name, version,
                                                       f"chunk {request.index} is no longer held here"))
                except (ArtifactError, OSError) as exc:
                    log.error("cannot read chunk %d of %s %s: %s", request.index, name, version, exc)
                    await context.abort(grpc.StatusCode.INTERNAL, f"chunk {request.index} is unreadable here")
                if self.faults.corrupt_chunks:
                    data = bytes(b ^ 0x5A for b in data)
                for start in range(0, len(data), PIECE_BYTES):
                    piece = data[start:start + PIECE_BYTES]
                    await self._upload.pace(len(piece))
                    self.counters.bytes_served += len(piece)
                    if as_origin:
                        self.counters.bytes_served_as_origin += len(piece)
                    by_version = self.counters.bytes_by_version
                    by_version[(name, version)] = by_version.get((name, version), 0) + len(piece)
                    yield pb.ChunkPiece(data=piece)
                    if start == 0:
                        self.origin.started(name, version, request.index)  # only once bytes went out
                self.counters.chunks_served += 1
                log.debug("served chunk %d of %s %s to %s", request.index, name, version, peer)
            finally:
                self._busy -= 1
