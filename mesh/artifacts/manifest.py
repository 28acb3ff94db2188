"""Signed model manifests: what a version is, chunk by chunk, and who vouches for it.

A manifest names a model version, its size and SHA-256, every content-defined
chunk (offset, size, SHA-256), the model's input/output signature and the
minimum runtime version. The publisher signs the canonical JSON of the
manifest with its Ed25519 key; a node trusts a manifest only after
`verify_manifest` has checked that signature against the fleet's publisher keys.

The codec is strict: a document from a peer is bounded in size, every field is
checked, unknown fields and unknown formats are refused, and a document whose
fields do not round-trip to the same canonical bytes is refused too (so one
signature never covers two spellings). Everything here is pure.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mesh.artifacts.signature import ModelSignature
from mesh.artifacts.signature import SignatureError as ModelSignatureFormatError
from mesh.identity.signing import (
    KEY_ID_HEX_CHARS,
    SIGNATURE_BYTES,
    KeyRole,
    KeyRoleError,
    SignatureError,
    SigningKey,
    TrustedKeys,
    UnknownKeyError,
    canonical_json,
)

FORMAT = 1
# A manifest of a 1 GiB model at 256 KiB chunks is ~4,000 chunk entries (~0.5 MB); 4 MiB leaves room
# while bounding what a peer can make us parse.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# pyfastcdc's own upper bound on max_size; also bounds what a peer must buffer for one chunk.
MAX_CHUNK_BYTES = 16 * 1024 * 1024
MAX_NAME_CHARS = 64

# Names and versions become file and directory names: one path component, no dot files, no separators.
_NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_KEY_ID_RE = re.compile(rf"[0-9a-f]{{{KEY_ID_HEX_CHARS}}}")
_SIGNATURE_HEX_RE = re.compile(rf"[0-9a-f]{{{2 * SIGNATURE_BYTES}}}")
_RUNTIME_VERSION_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6}){0,3}")
_CREATED_AT_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")

_MANIFEST_FIELDS = frozenset({
    "format", "name", "version", "size_bytes", "sha256", "chunks", "signature",
    "min_runtime_version", "publisher_key_id", "created_at",
})
_CHUNK_FIELDS = frozenset({"index", "offset", "size_bytes", "sha256"})
_SIGNED_FIELDS = frozenset({"manifest", "publisher_signature"})


class ArtifactError(Exception):
    """Root of every error raised by `mesh.artifacts`."""


class ManifestError(ArtifactError):
    """A manifest was refused."""


class ManifestFormatError(ManifestError):
    """A manifest document is malformed, too large, of an unknown format or internally inconsistent."""


class ManifestSignatureError(ManifestError):
    """A manifest is not signed by a trusted fleet publisher key, or was changed after signing."""


def check_name(value: object, what: str = "model name") -> str:
    """Return `value` if it is a safe model name or version (one path component), else raise."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ManifestFormatError(
            f"{what} {value!r} is not allowed: use 1-{MAX_NAME_CHARS} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _check_int(value: object, what: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ManifestFormatError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_sha256(value: object, what: str) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise ManifestFormatError(f"{what} must be 64 lowercase hex characters (SHA-256), got {value!r}")
    return value


def _check_created_at(value: object) -> str:
    if isinstance(value, str) and _CREATED_AT_RE.fullmatch(value):
        try:
            datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
            return value
        except ValueError:
            pass
    raise ManifestFormatError(f"created_at must be a UTC time like 2026-01-31T12:00:00Z, got {value!r}")


@dataclass(frozen=True)
class ChunkRef:
    """One content-defined chunk of a model file: position, length and SHA-256 of its bytes."""

    index: int
    offset: int
    size_bytes: int
    sha256: str

    def __post_init__(self) -> None:
        _check_int(self.index, "chunk index")
        _check_int(self.offset, f"chunk {self.index} offset")
        _check_int(self.size_bytes, f"chunk {self.index} size_bytes", minimum=1)
        if self.size_bytes > MAX_CHUNK_BYTES:
            raise ManifestFormatError(
                f"chunk {self.index} is {self.size_bytes} bytes; chunks may be at most {MAX_CHUNK_BYTES}"
            )
        _check_sha256(self.sha256, f"chunk {self.index} sha256")

    @property
    def end(self) -> int:
        return self.offset + self.size_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "offset": self.offset, "size_bytes": self.size_bytes,
                "sha256": self.sha256}

    @classmethod
    def from_dict(cls, raw: Any) -> ChunkRef:
        if not isinstance(raw, dict):
            raise ManifestFormatError(f"a chunk entry must be an object, got {type(raw).__name__}")
        _check_fields(raw, _CHUNK_FIELDS, "chunk entry")
        return cls(index=raw["index"], offset=raw["offset"], size_bytes=raw["size_bytes"],
                   sha256=raw["sha256"])


@dataclass(frozen=True)
class Manifest:
    """What a model version is. Immutable: a (name, version) pair names exactly one manifest."""

    name: str
    version: str
    size_bytes: int
    sha256: str
    chunks: tuple[ChunkRef, ...]
    signature: ModelSignature  # the model's input/output tensors, not the publisher's signature
    min_runtime_version: str
    publisher_key_id: str
    created_at: str  # UTC, "2026-01-31T12:00:00Z"
    format: int = FORMAT

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ManifestFormatError(_format_message(self.format))
        check_name(self.name, "model name")
        check_name(self.version, f"version of {self.name}")
        label = f"manifest for {self.name} {self.version}"
        _check_int(self.size_bytes, f"{label}: size_bytes", minimum=1)
        _check_sha256(self.sha256, f"{label}: sha256")
        if not isinstance(self.chunks, tuple) or not all(isinstance(c, ChunkRef) for c in self.chunks):
            raise ManifestFormatError(f"{label}: chunks must be a tuple of ChunkRef")
        if not self.chunks:
            raise ManifestFormatError(f"{label}: has no chunks")
        expected_offset = 0
        for i, chunk in enumerate(self.chunks):
            if chunk.index != i:
                raise ManifestFormatError(f"{label}: chunk at position {i} has index {chunk.index}")
            if chunk.offset != expected_offset:
                raise ManifestFormatError(
                    f"{label}: chunk {i} starts at offset {chunk.offset}, expected {expected_offset} "
                    "(chunks must be contiguous)"
                )
            expected_offset = chunk.end
        if expected_offset != self.size_bytes:
            raise ManifestFormatError(
                f"{label}: chunk sizes add up to {expected_offset} bytes, but size_bytes is {self.size_bytes}"
            )
        if not isinstance(self.signature, ModelSignature):
            raise ManifestFormatError(f"{label}: signature must be a ModelSignature")
        if not isinstance(self.min_runtime_version, str) or not _RUNTIME_VERSION_RE.fullmatch(
                self.min_runtime_version):
            raise ManifestFormatError(
                f"{label}: min_runtime_version must look like 2.3.0, got {self.min_runtime_version!r}"
            )
        if not isinstance(self.publisher_key_id, str) or not _KEY_ID_RE.fullmatch(self.publisher_key_id):
            raise ManifestFormatError(
                f"{label}: publisher_key_id must be {KEY_ID_HEX_CHARS} lowercase hex characters, "
                f"got {self.publisher_key_id!r}"
            )
        _check_created_at(self.created_at)

    @property
    def label(self) -> str:
        """`name version`, as people write it in messages."""
        return f"{self.name} {self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "chunks": [c.to_dict() for c in self.chunks],
            "signature": self.signature.to_dict(),
            "min_runtime_version": self.min_runtime_version,
            "publisher_key_id": self.publisher_key_id,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Manifest:
        if not isinstance(raw, dict):
            raise ManifestFormatError(f"a manifest must be a JSON object, got {type(raw).__name__}")
        # The format is checked first, so a newer document gets "upgrade" rather than a field complaint.
        if "format" not in raw:
            raise ManifestFormatError("manifest has no 'format' field")
        if raw["format"] != FORMAT or isinstance(raw["format"], bool):
            raise ManifestFormatError(_format_message(raw["format"]))
        _check_fields(raw, _MANIFEST_FIELDS, "manifest")
        if not isinstance(raw["chunks"], list):
            raise ManifestFormatError("manifest chunks must be a list")
        try:
            signature = ModelSignature.from_dict(raw["signature"])
        except (ModelSignatureFormatError, ValueError, TypeError, OverflowError) as exc:
            raise ManifestFormatError(f"manifest model signature: {exc}") from None
        return cls(
            format=raw["format"],
            name=raw["name"],
            version=raw["version"],
            size_bytes=raw["size_bytes"],
            sha256=raw["sha256"],
            chunks=tuple(ChunkRef.from_dict(c) for c in raw["chunks"]),
            signature=signature,
            min_runtime_version=raw["min_runtime_version"],
            publisher_key_id=raw["publisher_key_id"],
            created_at=raw["created_at"],
        )

    def canonical_bytes(self) -> bytes:
        """The exact bytes the publisher signs."""
        return canonical_json(self.to_dict())

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 hex of the signed bytes: names this manifest in gossip ("version V, digest D")."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


@dataclass(frozen=True)
class SignedManifest:
    """A manifest and the publisher's Ed25519 signature over `manifest.canonical_bytes()`.

    Holding one proves nothing: call `verify_manifest` before trusting it.
    """

    manifest: Manifest
    publisher_signature: bytes

    def __post_init__(self) -> None:
        sig = self.publisher_signature
        if not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
            raise ManifestFormatError(
                f"manifest for {self.manifest.label}: publisher_signature must be {SIGNATURE_BYTES} bytes"
            )

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def to_json(self) -> bytes:
        return canonical_json({"manifest": self.manifest.to_dict(),
                               "publisher_signature": self.publisher_signature.hex()})

    @classmethod
    def from_json(cls, data: bytes) -> SignedManifest:
        """Parse a signed manifest document; any problem raises ManifestFormatError (never another error).

        The signature is not checked here; see `verify_manifest`.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ManifestFormatError(f"a manifest document is bytes, got {type(data).__name__}")
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestFormatError(
                f"manifest document is {len(data)} bytes; the limit is {MAX_MANIFEST_BYTES}"
            )
        try:
            raw = json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant,
                             parse_float=_finite_float)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ManifestFormatError(f"manifest document is not valid UTF-8 JSON: {_short(exc)}") from None
        if not isinstance(raw, dict):
            raise ManifestFormatError(f"manifest document must be a JSON object, got {type(raw).__name__}")
        if isinstance(raw.get("manifest"), dict) and "format" in raw["manifest"]:
            fmt = raw["manifest"]["format"]
            if fmt != FORMAT or isinstance(fmt, bool):
                raise ManifestFormatError(_format_message(fmt))
        _check_fields(raw, _SIGNED_FIELDS, "signed manifest document")
        manifest = Manifest.from_dict(raw["manifest"])
        sig_hex = raw["publisher_signature"]
        if not isinstance(sig_hex, str) or not _SIGNATURE_HEX_RE.fullmatch(sig_hex):
            raise ManifestFormatError(
                f"manifest for {manifest.label}: publisher_signature must be {2 * SIGNATURE_BYTES} "
                "lowercase hex characters"
            )
        try:
            same = canonical_json(raw["manifest"]) == manifest.canonical_bytes()
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ManifestFormatError(
                f"manifest for {manifest.label} is not in canonical form (a field is spelled differently "
                "from what was signed, e.g. 1.0 for 1)"
            )
        return cls(manifest, bytes.fromhex(sig_hex))


def sign_manifest(manifest: Manifest, key: SigningKey) -> SignedManifest:
    """Sign `manifest` with the fleet publisher key it names."""
    if key.role is not KeyRole.PUBLISHER:
        raise ManifestSignatureError(
            f"cannot sign manifest for {manifest.label} with {key.role.value} key {key.key_id}: "
            "manifests are signed with the fleet publisher key"
        )
    if key.key_id != manifest.publisher_key_id:
        raise ManifestSignatureError(
            f"manifest for {manifest.label} names publisher key {manifest.publisher_key_id}, "
            f"but the signing key is {key.key_id}"
        )
    return SignedManifest(manifest, key.sign(manifest.canonical_bytes()))


def verify_manifest(signed: SignedManifest, trusted: TrustedKeys) -> Manifest:
    """Return the manifest if a trusted fleet publisher key signed exactly these bytes.

    Raises ManifestSignatureError naming the model, version and key otherwise.
    """
    manifest = signed.manifest
    kid = manifest.publisher_key_id
    try:
        trusted.verify(KeyRole.PUBLISHER, manifest.canonical_bytes(), signed.publisher_signature, kid)
    except UnknownKeyError:
        raise ManifestSignatureError(
            f"manifest for {manifest.label} is signed by key {kid}, which is not a fleet publisher key "
            "(this node does not trust that key at all)"
        ) from None
    except KeyRoleError:
        role = next((k.role.value for k in trusted if k.key_id == kid), "different")
        raise ManifestSignatureError(
            f"manifest for {manifest.label} is signed by key {kid}, which is not a fleet publisher key "
            f"(it is {'an' if role[0] in 'aeiou' else 'a'} {role} key)"
        ) from None
    except SignatureError:
        raise ManifestSignatureError(
            f"manifest for {manifest.label} does not match its signature by publisher key {kid}: "
            "it was changed after signing"
        ) from None
    return manifest


def _check_fields(raw: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = set(raw) - allowed
    if unknown:
        raise ManifestFormatError(f"{what} has unknown fields {sorted(map(str, unknown))}")
    missing = allowed - set(raw)
    if missing:
        raise ManifestFormatError(f"{what} is missing fields {sorted(missing)}")


def _format_message(fmt: object) -> str:
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > FORMAT:
        return (f"manifest format {fmt} is newer than this node understands (format {FORMAT}); "
                "upgrade the node to use this model")
    return f"manifest format {_short(repr(fmt))} is not known (this node reads format {FORMAT})"


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a manifest")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {_short(text)} is out of range")
    return value


def _short(exc: BaseException | str) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."
