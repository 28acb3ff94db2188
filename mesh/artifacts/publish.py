"""From a .tflite file to a signed, chunked, stored model version (`mesh model publish`).

The publisher's node becomes the origin: it holds every chunk and the
assembled model, so it can seed the version to its peers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime
from pathlib import Path

from mesh.artifacts.chunking import ChunkParams, plan_chunks
from mesh.artifacts.manifest import (
    ArtifactError,
    ChunkRef,
    Manifest,
    ManifestFormatError,
    SignedManifest,
    check_name,
    sign_manifest,
)
from mesh.artifacts.store import ArtifactStore
from mesh.identity.signing import KeyRole, SigningKey, TrustedKeys
from mesh.inference.backend import Backend, BackendUnavailable, ModelLoadError, load_backend

DEFAULT_CHUNK_PARAMS = ChunkParams()
DEFAULT_MIN_RUNTIME_VERSION = "2.3.0"  # the LiteRT version these models are validated on
_TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier at bytes 4..8 of every .tflite file


class PublishError(ArtifactError):
    """A model cannot be published; the message says why and what to fix."""


def publish(model_path: Path, *, name: str, version: str, key: SigningKey, store: ArtifactStore,
            params: ChunkParams | None = None,
            min_runtime_version: str = DEFAULT_MIN_RUNTIME_VERSION,
            created_at: str | None = None, backend: Backend | None = None) -> SignedManifest:
    """Validate that `model_path` loads, chunk it, sign its manifest and store everything.

    `params=None` chunks like the newest version of `name` published at this store (so a new
    version shares the old one's cuts and peers fetch only the changed chunks), else with
    DEFAULT_CHUNK_PARAMS; `chunking_for` tells which applies.

    Raises PublishError for a bad file, name or key; StoreError (including ManifestConflictError
    when this name and version already hold different bytes) for storage problems.
    """
    model_path = Path(model_path)
    try:
        check_name(name, "model name")
        check_name(version, f"version of {name}")
    except ManifestFormatError as exc:
        raise PublishError(str(exc)) from None
    if key.role is not KeyRole.PUBLISHER:
        raise PublishError(
            f"key {key.key_id} is a {key.role.value} key; "
            "manifests must be signed with the fleet publisher key"
        )
    try:
        data = model_path.read_bytes()
    except OSError as exc:
        raise PublishError(f"cannot read {model_path}: {exc.strerror or exc}") from None
    if len(data) < 8 or data[4:8] != _TFLITE_IDENTIFIER:
        raise PublishError(f"{model_path} is not a .tflite model (no TFL3 flatbuffer identifier)")
    try:
        # Load the very bytes that get chunked, not the path again: the file may change meanwhile.
        signature = (backend or load_backend()).load(data).signature
    except ModelLoadError as exc:
        raise PublishError(f"{model_path} does not load in the TFLite runtime: {exc}") from None
    except BackendUnavailable as exc:
        raise PublishError(f"cannot validate {model_path}: {exc}") from None
    if params is None:
        params, _ = chunking_for(store, name)
    chunks = plan_chunks(data, params)
    try:
        manifest = Manifest(
            name=name, version=version, size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(), chunks=tuple(chunks), signature=signature,
            min_runtime_version=min_runtime_version, publisher_key_id=key.key_id,
            created_at=created_at or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
    except ManifestFormatError as exc:
        raise PublishError(str(exc)) from None
    signed = sign_manifest(manifest, key)
    # Under the store lock: a running node neither sweeps these files as garbage nor announces
    # the version before it is complete and marked as published here.
    with store.locked():
        earlier = _earlier_run(store, manifest)
        if earlier is not None:  # the same file, published before but perhaps not to the end
            signed, manifest = earlier, earlier.manifest
        store.save_manifest(signed, trusted=TrustedKeys([key.verify_key]))
        # Marked before the chunks: a publish killed later and run again (which then finds the
        # version's manifest) still leaves this node its origin.
        store.mark_origin(name, version, chunking=params)
        view = memoryview(data)
        for ref in chunks:
            store.put_manifest_chunk(manifest, ref.index, view[ref.offset:ref.end])
        store.assemble(manifest)
    return signed


def _earlier_run(store: ArtifactStore, manifest: Manifest) -> SignedManifest | None:
    """The stored manifest of this version if it describes the very same file, chunks and signer
    (only its creation time differs): a publish that was killed midway is finished, not refused."""
    try:
        stored = store.load_manifest(manifest.name, manifest.version)
    except (FileNotFoundError, ArtifactError):
        return None
    same = dataclasses.replace(stored.manifest, created_at=manifest.created_at) == manifest
    return stored if same else None


def chunking_for(store: ArtifactStore, name: str) -> tuple[ChunkParams, str | None]:
    """The chunk parameters a new version of `name` gets by default, and the version they come
    from (None: the defaults, nothing of `name` was published at this store)."""
    previous = store.published_chunking(name)
    if previous is None:
        return DEFAULT_CHUNK_PARAMS, None
    version, params = previous
    return params, version


def delta(old: Manifest | None, new: Manifest) -> list[ChunkRef]:
    """Chunks of `new` whose bytes `old` does not hold, each distinct chunk once, in file order.

    A node holding `old` fetches only these to build `new`; with no old version, all of `new`.
    """
    have = {c.sha256 for c in old.chunks} if old is not None else set()
    out = []
    for ref in new.chunks:
        if ref.sha256 not in have:
            have.add(ref.sha256)
            out.append(ref)
    return out
