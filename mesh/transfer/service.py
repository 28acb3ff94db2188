"""The Transfer gRPC service: serves signed manifests and verified chunks to
fleet peers, within this node's upload caps.

Thin shell over the artifact store: every byte served comes from
`ArtifactStore.read_chunk`, which re-verifies the chunk's hash, so a node
never passes on bytes that rotted on its disk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from mesh._proto import transfer_pb2 as pb
from mesh._proto import transfer_pb2_grpc as pb_grpc
from mesh.artifacts.manifest import ArtifactError, check_name
from mesh.artifacts.store import ArtifactStore, BadChunkError
from mesh.identity.ca import Role
from mesh.identity.tls import peer_identity
from mesh.transfer.pacing import Pacer

log = logging.getLogger("mesh.transfer")

# Pieces of a chunk per stream message: small enough that the upload cap paces
# smoothly and a cancelled transfer stops quickly.
PIECE_BYTES = 64 * 1024


@dataclass
class UploadCounters:
    """What this node served, for metrics and for tests that count origin egress."""

    bytes_served: int = 0
    chunks_served: int = 0
    bytes_by_version: dict[tuple[str, str], int] = field(default_factory=dict)
    manifests_served: int = 0
    refused_busy: int = 0


class ServeFaults:
    """Test-only misbehaviour: serve corrupted chunk bytes (a bad peer)."""

    def __init__(self) -> None:
        self.corrupt_chunks = False


class OriginPolicy:
    """How the origin keeps its egress near one copy of each version.

    Peers already ask the origin only for chunks no peer holds, one node per
    chunk (the scheduler's rendezvous). But peers that learn of a release at the
    same moment do not yet know each other, and each may think itself the one.
    So the origin also refuses, with RESOURCE_EXHAUSTED ("fetch it from a
    peer"), a chunk that it is uploading right now (unless that upload has
    stalled) or finished uploading less than two `settle_s` ago (the
    receiver's announcement is on its way). The
    refused node backs off and gets the chunk from a peer; later requests
    (every holder died, or banned) are served.
    """

    def __init__(self, *, is_origin: Callable[[str, str], bool], settle_s: Callable[[], float],
                 now: Callable[[], float]) -> None:
        self.is_origin = is_origin
        self.settle_s = settle_s
        self.now = now
        # Uploads in progress: handle -> when it last sent a piece.
        self._uploading: dict[tuple[str, str, int], dict[object, float]] = {}
        self._served_at: dict[tuple[str, str, int], float] = {}

    def refuse(self, name: str, version: str, index: int) -> str | None:
        if not self.is_origin(name, version):
            return None
        key = (name, version, index)
        now, settle_s = self.now(), self.settle_s()
        # An upload that stopped moving (a vanished receiver) stops holding others back.
        uploads = self._uploading.get(key)
        if uploads and now - max(uploads.values()) < max(4 * settle_s, 2.0):
            return f"the origin is already sending chunk {index} of {name} {version} to a peer; fetch it from peers"
        if now - self._served_at.get(key, -float("inf")) < 2 * settle_s:
            return f"chunk {index} of {name} {version} was just sent to a peer; fetch it from peers"
        # No "a peer announces it" rule: the requester may have banned that peer for
        # serving bad bytes, and only it knows; it asks us only when it has no peer.
        return None

    def started(self, name: str, version: str, index: int) -> object:
        """Register an upload; returns its handle for `progressed` and `finished`."""
        handle = object()
        self._uploading.setdefault((name, version, index), {})[handle] = self.now()
        return handle

    def progressed(self, name: str, version: str, index: int, handle: object) -> None:
        self._uploading[(name, version, index)][handle] = self.now()

    def finished(self, name: str, version: str, index: int, handle: object, *, complete: bool) -> None:
        key = (name, version, index)
        del self._uploading[key][handle]
        if not self._uploading[key]:
            del self._uploading[key]
        if complete:
            self._served_at[key] = self.now()


class TransferServicer(pb_grpc.TransferServicer):
    def __init__(self, store: ArtifactStore, *, max_uploads: int, upload: Pacer,
                 faults: ServeFaults | None = None, origin: OriginPolicy | None = None) -> None:
        self.origin = origin
        self._store = store
        self._slots = asyncio.Semaphore(max_uploads)
        self._max_uploads = max_uploads
        self._busy = 0
        self._upload = upload
        self.faults = faults or ServeFaults()
        self.counters = UploadCounters()

    async def _require_node(self, context: grpc.aio.ServicerContext) -> str:
        peer = peer_identity(context)
        if peer is None or peer.role is not Role.NODE:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "transfer calls need a fleet node certificate")
        return peer.name

    async def _names(self, request, context) -> tuple[str, str]:
        try:
            return check_name(request.name, "model name"), check_name(request.version, "model version")
        except ArtifactError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _manifest(self, name: str, version: str, context):
        try:
            return self._store.load_manifest(name, version)
        except FileNotFoundError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no manifest for {name} {version} on this node")
        except (ArtifactError, OSError) as exc:
            log.error("cannot read manifest %s %s: %s", name, version, exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"manifest for {name} {version} is unreadable here")

    async def GetManifest(self, request: pb.ManifestRequest, context) -> pb.ManifestReply:
        await self._require_node(context)
        name, version = await self._names(request, context)
        signed = await self._manifest(name, version, context)
        self.counters.manifests_served += 1
        return pb.ManifestReply(signed_manifest=signed.to_json())

    async def FetchChunk(self, request: pb.ChunkRequest, context):
        peer = await self._require_node(context)
        name, version = await self._names(request, context)
        manifest = (await self._manifest(name, version, context)).manifest
        if request.index >= len(manifest.chunks):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{name} {version} has chunks 0..{len(manifest.chunks) - 1}, not {request.index}")
        ref = manifest.chunks[request.index]
        if not self._store.has_chunk(ref.sha256):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"chunk {request.index} of {name} {version} is not held here")
        refusal = self.origin.refuse(name, version, request.index) if self.origin else None
        if refusal:
            self.counters.refused_busy += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        if self._busy >= self._max_uploads:
            self.counters.refused_busy += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"all {self._max_uploads} upload slots are busy; ask another peer")
        async with self._slots:
            self._busy += 1
            handle = self.origin.started(name, version, request.index) if self.origin else None
            complete = False
            try:
                try:
                    data = await asyncio.to_thread(self._store.read_chunk, ref.sha256)
                except BadChunkError as exc:
                    log.error("not serving chunk %d of %s %s: %s", request.index, name, version, exc)
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"chunk {request.index} is no longer held here")
                except (ArtifactError, OSError) as exc:
                    log.error("cannot read chunk %d of %s %s: %s", request.index, name, version, exc)
                    await context.abort(grpc.StatusCode.INTERNAL, f"chunk {request.index} is unreadable here")
                if self.faults.corrupt_chunks:
                    data = bytes(b ^ 0x5A for b in data)
                for start in range(0, len(data), PIECE_BYTES):
                    piece = data[start:start + PIECE_BYTES]
                    await self._upload.pace(len(piece))
                    if handle is not None:
                        self.origin.progressed(name, version, request.index, handle)
                    self.counters.bytes_served += len(piece)
                    by_version = self.counters.bytes_by_version
                    by_version[(name, version)] = by_version.get((name, version), 0) + len(piece)
                    yield pb.ChunkPiece(data=piece)
                self.counters.chunks_served += 1
                complete = True
                log.debug("served chunk %d of %s %s to %s", request.index, name, version, peer)
            finally:
                self._busy -= 1
                if handle is not None:
                    self.origin.finished(name, version, request.index, handle, complete=complete)
