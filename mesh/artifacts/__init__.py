"""Signed model manifests, content-defined chunks, the on-disk chunk store and deltas.

Pure cores: `manifest` (codec and signature verification), `signature` (a model's tensor
signature, which a manifest carries and the inference runtime checks), `chunking` (chunk plan),
`bitfield` (which chunks a node holds). I/O: `store` (the node's artifact directory) and
`publish` (file -> signed, stored version). `publish` checks the model with the inference
backend, which imports `signature` from here, so it is not imported by this package: use
`mesh.artifacts.publish`.
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
    "SignedManifest",
    "StoreError",
    "VersionStatus",
    "plan_chunks",
    "sign_manifest",
    "verify_manifest",
]
