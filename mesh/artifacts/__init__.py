"""Signed model manifests, content-defined chunks, the on-disk chunk store and deltas.

Pure cores: `manifest` (codec and signature verification), `signature` (a model's tensor
signature, which a manifest carries and the inference runtime checks), `chunking` (chunk plan),
`bitfield` (which chunks a node holds). I/O: `store` (the node's artifact directory) and
`publish` (file -> signed, stored version).
"""

from mesh.artifacts.bitfield import Bitfield, BitfieldError
from mesh.artifacts.chunking import ChunkingError, ChunkParams, plan_chunks
from mesh.artifacts.manifest import (
    FORMAT,
    MAX_MANIFEST_BYTES,
    ArtifactError,
    ChunkRef,
    Manifest,
    ManifestError,
    ManifestFormatError,
    ManifestSignatureError,
    SignedManifest,
    sign_manifest,
    verify_manifest,
)
from mesh.artifacts.publish import PublishError, delta, publish
from mesh.artifacts.store import (
    ArtifactStore,
    BadChunkError,
    IncompleteVersionError,
    ManifestConflictError,
    MissingChunkError,
    StoreError,
    VersionStatus,
)

__all__ = [
    "FORMAT",
    "MAX_MANIFEST_BYTES",
    "ArtifactError",
    "ArtifactStore",
    "BadChunkError",
    "Bitfield",
    "BitfieldError",
    "ChunkParams",
    "ChunkRef",
    "ChunkingError",
    "IncompleteVersionError",
    "Manifest",
    "ManifestConflictError",
    "ManifestError",
    "ManifestFormatError",
    "ManifestSignatureError",
    "MissingChunkError",
    "PublishError",
    "SignedManifest",
    "StoreError",
    "VersionStatus",
    "delta",
    "plan_chunks",
    "publish",
    "sign_manifest",
    "verify_manifest",
]
