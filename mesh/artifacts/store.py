"""The on-disk artifact store of one node: content-addressed chunks, signed
manifests and assembled models.

Layout under the store's root (the node gives it a directory of its own,
e.g. <data_dir>/artifacts):

    chunks/<first two hex>/<sha256>         chunk bytes, named by their SHA-256, until a
                                            complete model holds them (see below)
    manifests/<name>/<version>.json         signed manifest, as received
    manifests/<name>/<version>.origin       present if the version was published here
    models/<name>/<version>.tflite          the whole model, only once complete
    .lock                                   flock: publish (exclusive) against GC and rescans

Rules that make crashes harmless:
- Every file is written to a temporary name in its final directory, fsynced,
  renamed, and the directory fsynced. A final name never holds half a file.
  The writer holds an flock on its temp file; on open, temp files nobody holds
  are leftovers of a dead writer and are removed.
- A chunk is stored only after its bytes hash to its name (and, through
  `put_manifest_chunk`, to the manifest's entry for that index).
- A manifest is stored only after its publisher signature verifies.
- A published version's origin mark is written right after its manifest
  (it counts only once the version is complete) and removed before it.
- A version is complete only when models/<name>/<version>.tflite exists, and
  that file is renamed into place only after every chunk was present and the
  whole file hashed to the manifest's SHA-256. A partial download is never
  visible as a complete version; its verified chunks survive a restart.
- Disk full or an I/O error fails the one write with StoreError, removes its
  temp file and leaves every stored file as it was.

A chunk is stored once: a complete model holds the bytes of every chunk of its
version, so once a model is assembled its chunk files are removed and the
chunks are read (and re-verified) from the model file. Garbage collection
writes a chunk back to its own file before it removes the last complete model
holding it, if a kept version still needs it.

One process writes a store at a time (the node), except that `mesh model
publish` adds a version from another process. It does so under an exclusive
flock on .lock; the node's garbage collection holds the same lock while it
lists and sweeps, and its rescan for new versions takes it shared without
waiting, so neither sees half a publish. Others may read the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.artifacts.bitfield import Bitfield
from mesh.artifacts.chunking import ChunkParams
from mesh.artifacts.manifest import (
    ArtifactError,
    ChunkRef,
    Manifest,
    ManifestError,
    SignedManifest,
    check_name,
    verify_manifest,
)
from mesh.durable import fsync_dir
from mesh.identity.signing import TrustedKeys

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
ORIGIN_SUFFIX = ".origin"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_READ_BLOCK_BYTES = 1024 * 1024


class StoreError(ArtifactError):
    """The store could not read or write a file; the message names the path and what to do."""


class BadChunkError(StoreError):
    """Chunk bytes do not hash to what they claim (or what the manifest says); they were not stored."""


class MissingChunkError(StoreError):
    """A chunk asked for is not in the store (yet)."""


class IncompleteVersionError(StoreError):
    """A version was asked for as a whole model, but chunks of it are still missing."""


class ManifestConflictError(StoreError):
    """A different manifest is already stored under the same model name and version."""


@dataclass(frozen=True)
class VersionStatus:
    """One stored version as `mesh model ls` shows it."""

    name: str
    version: str
    complete: bool
    have_chunks: int
    total_chunks: int
    bytes_have: int
    size_bytes: int
    digest: str


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_name(value: str) -> bool:
    """A file name this store could have written (temp files and strays are not)."""
    try:
        check_name(value)
        return True
    except ArtifactError:
        return False


def version_order_key(version: str) -> tuple:
    """Natural order: 1.9 before 1.10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", version) if p)


class ArtifactStore:
    """Chunks, manifests and complete models of one node, safe against crashes and full disks."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.chunks_dir = self.root / "chunks"
        self.manifests_dir = self.root / "manifests"
        self.models_dir = self.root / "models"
        for directory in (self.root, self.chunks_dir, self.manifests_dir, self.models_dir):
            self._mkdir(directory)
        self._packed_cache: tuple[tuple, dict[str, list[tuple[Path, int, int]]]] | None = None
        self._bad: set[tuple[str, int, int, int]] = set()  # (model path, inode, mtime_ns, offset) that rotted
        self.removed_temp_files = self._sweep_temp_files()
        with self.locked(exclusive=False):
            pass  # creates .lock now, with this process's owner and umask

    # --- chunks -------------------------------------------------------------------------------

    def chunk_path(self, sha256: str) -> Path:
        if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
            raise BadChunkError(f"{sha256!r} is not a SHA-256 hex digest")
        return self.chunks_dir / sha256[:2] / sha256

    def has_chunk(self, sha256: str) -> bool:
        return self.chunk_path(sha256).is_file() or sha256 in self._packed()

    def _packed(self) -> dict[str, list[tuple[Path, int, int]]]:
        """sha256 -> every (model file, offset, size) holding that chunk in a complete model.

        Rebuilt when a model file or its manifest changes (here, or by a publish in another
        process); ranges found rotted are left out until their model file changes."""
        files = []
        for name in sorted(self._listdir(self.models_dir)):
            for file in sorted(self._listdir(self.models_dir / name)):
                if not file.endswith(".tflite") or file.startswith("."):
                    continue
                version = file[: -len(".tflite")]
                try:
                    model = (self.models_dir / name / file).stat()
                    manifest_stat = self.manifests_dir.joinpath(name, f"{version}.json").stat()
                except OSError:
                    continue  # no manifest: not a complete version
                files.append((name, version, model.st_size, model.st_mtime_ns, model.st_ino,
                              manifest_stat.st_mtime_ns, manifest_stat.st_ino))
        fingerprint = (tuple(files), len(self._bad))
        cached = self._packed_cache
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        index: dict[str, list[tuple[Path, int, int]]] = {}
        clean = True
        for name, version, size, mtime_ns, ino, _, _ in files:
            try:
                manifest = self.load_manifest(name, version).manifest
            except FileNotFoundError:
                continue
            except (ArtifactError, OSError) as exc:
                log.warning("not serving chunks from the model of %s %s: %s", name, version, exc)
                clean = False
                continue
            if manifest.size_bytes != size:
                continue
            path = self.model_path(name, version)
            for ref in manifest.chunks:
                if (str(path), ino, mtime_ns, ref.offset) not in self._bad:
                    index.setdefault(ref.sha256, []).append((path, ref.offset, ref.size_bytes))
        if clean:  # an index missing a model for a passing reason is rebuilt next time
            self._packed_cache = (fingerprint, index)
        return index

    def put_chunk(self, sha256: str, data: bytes) -> Path:
        """Store `data` under its SHA-256 after checking it is `sha256`; return the chunk's path."""
        path = self.chunk_path(sha256)
        actual = _sha256(data)
        if actual != sha256:
            raise BadChunkError(
                f"chunk bytes hash to {actual[:16]}..., not {sha256[:16]}...: refusing to store them "
                "(the sender served bad bytes)"
            )
        return self._put_verified(path, data)

    def put_manifest_chunk(self, manifest: Manifest, index: int, data: bytes | memoryview) -> Path:
        """Store chunk `index` of `manifest` after checking its size and hash against the manifest."""
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(manifest.chunks):
            raise BadChunkError(f"{manifest.label} has chunks 0..{len(manifest.chunks) - 1}, not {index!r}")
        ref = manifest.chunks[index]
        if len(data) != ref.size_bytes:
            raise BadChunkError(
                f"chunk {index} of {manifest.label} is {ref.size_bytes} bytes, got {len(data)}: refusing it"
            )
        actual = _sha256(data)
        if actual != ref.sha256:
            raise BadChunkError(
                f"chunk {index} of {manifest.label} hashes to {actual[:16]}..., the manifest says "
                f"{ref.sha256[:16]}...: refusing it (the sender served bad bytes)"
            )
        return self._put_verified(self.chunk_path(ref.sha256), data)

    def _put_verified(self, path: Path, data: bytes | memoryview) -> Path:
        # Content-addressed: the same name always holds the same bytes, and a chunk a complete
        # model holds is not stored twice.
        if not path.is_file() and path.name not in self._packed():
            self._write_atomic(path, [data], f"chunk {path.name[:16]}...")
        return path

    def read_chunk(self, sha256: str) -> bytes:
        """The chunk's bytes, re-verified; a chunk that rotted on disk is removed and BadChunkError raised."""
        path = self.chunk_path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return self._read_packed(sha256)
        except OSError as exc:
            raise self._os_error(exc, "read", path) from None
        if _sha256(data) != sha256:
            log.warning("chunk %s is corrupt on disk; removing it so it is fetched again", path)
            self._unlink(path)
            raise BadChunkError(f"chunk {path} no longer matches its hash (disk corruption); removed it")
        return data

    def _read_packed(self, sha256: str) -> bytes:
        """The chunk's bytes from a complete model holding them, re-verified; a holder whose
        bytes rotted is logged and left out from then on."""
        holders = self._packed().get(sha256, [])
        if not holders:
            raise MissingChunkError(f"chunk {sha256[:16]}... is not in the store ({self.chunk_path(sha256)})")
        rotted = []
        for path, offset, size in holders:
            try:
                with open(path, "rb") as f:
                    stat = os.fstat(f.fileno())
                    data = os.pread(f.fileno(), size, offset)
            except FileNotFoundError:  # collected meanwhile
                continue
            except OSError as exc:
                raise self._os_error(exc, "read", path) from None
            if len(data) == size and _sha256(data) == sha256:
                return data
            # The model itself rotted: activation re-hashes it and refuses it; the chunk is
            # read from another holder, or shown missing and fetched again.
            log.error("model file %s is corrupt on disk: bytes %d..%d no longer match chunk %s",
                      path, offset, offset + size, sha256[:16])
            self._bad.add((str(path), stat.st_ino, stat.st_mtime_ns, offset))
            rotted.append(str(path))
        if rotted:
            raise BadChunkError(f"chunk {sha256[:16]}... in {', '.join(rotted)} no longer matches its hash "
                                "(disk corruption)")
        raise MissingChunkError(f"chunk {sha256[:16]}... is not in the store (its models are gone)")

    def chunk_names(self) -> Iterator[str]:
        """SHA-256 of every stored chunk (temp files excluded)."""
        for sub in sorted(self._listdir(self.chunks_dir)):
            for name in sorted(self._listdir(self.chunks_dir / sub)):
                if _SHA256_RE.fullmatch(name) and name[:2] == sub:
                    yield name

    # --- manifests ----------------------------------------------------------------------------

    def manifest_path(self, name: str, version: str) -> Path:
        check_name(name, "model name")
        check_name(version, f"version of {name}")
        return self.manifests_dir / name / f"{version}.json"

    def model_path(self, name: str, version: str) -> Path:
        """Where the complete model of this version lives (it may not exist yet)."""
        check_name(name, "model name")
        check_name(version, f"version of {name}")
        return self.models_dir / name / f"{version}.tflite"

    def origin_path(self, name: str, version: str) -> Path:
        """The marker saying this version was published at this store (the node is its origin)."""
        return self.manifest_path(name, version).with_suffix(ORIGIN_SUFFIX)

    def mark_origin(self, name: str, version: str, *, chunking: ChunkParams | None = None) -> None:
        """Record, durably, that this version was published here (a restarted origin stays the
        origin) and with which chunk parameters (the next version reuses them: same cuts, small delta)."""
        path = self.origin_path(name, version)
        if path.exists():
            return
        record: dict[str, Any] = {"published_here": True}
        if chunking is not None:
            record["chunking"] = dataclasses.asdict(chunking)
        self._write_atomic(path, [json.dumps(record).encode() + b"\n"], f"origin marker for {name} {version}")

    def is_origin(self, name: str, version: str) -> bool:
        return self.origin_path(name, version).exists()

    def published_chunking(self, name: str) -> tuple[str, ChunkParams] | None:
        """(version, chunk parameters) of the newest version of `name` published here that
        recorded them; None if there is none."""
        for stored_name, version in reversed(self.stored_versions()):
            if stored_name != name:
                continue
            try:
                record = json.loads(self.origin_path(name, version).read_bytes())
            except FileNotFoundError:
                continue  # received from a peer, not published here
            except (OSError, ValueError) as exc:
                log.warning("cannot read the origin record of %s %s: %s", name, version, exc)
                return None
            # The newest version published here decides; an older one may have been cut otherwise.
            try:
                return version, ChunkParams(**record["chunking"])
            except (KeyError, TypeError, ArtifactError):
                return None
        return None

    @contextmanager
    def locked(self, *, exclusive: bool = True, wait: bool = True) -> Iterator[None]:
        """Hold the store's cross-process lock (see the module docstring).

        With wait=False, raises BlockingIOError at once if another process holds it."""
        path = self.root / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            try:  # made by another user (say, a publish run with sudo): flock works read-only too
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise self._os_error(exc, "open", path) from None
        except OSError as exc:
            raise self._os_error(exc, "open", path) from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
            yield
        finally:
            os.close(fd)

    def save_manifest(self, signed: SignedManifest, *, trusted: TrustedKeys) -> Manifest:
        """Verify the publisher signature, then store the manifest; return it.

        Saving the same manifest twice is a no-op. A version is immutable: a different manifest
        for a stored (name, version) raises ManifestConflictError.
        """
        manifest = verify_manifest(signed, trusted)
        path = self.manifest_path(manifest.name, manifest.version)
        try:
            existing = self.load_manifest(manifest.name, manifest.version)
        except FileNotFoundError:
            existing = None
        except ManifestError as exc:
            log.warning("replacing unreadable manifest %s: %s", path, exc)
            existing = None
        if existing is not None:
            if existing.digest == manifest.digest:
                return manifest
            raise ManifestConflictError(
                f"{manifest.label} is already stored with manifest digest {existing.digest[:16]}...; "
                f"refusing a different manifest (digest {manifest.digest[:16]}...) under the same version: "
                "versions are immutable, publish a new version"
            )
        self._write_atomic(path, [signed.to_json()], f"manifest for {manifest.label}")
        return manifest

    def load_manifest(self, name: str, version: str) -> SignedManifest:
        """The stored signed manifest; FileNotFoundError if absent, ManifestError if unreadable.

        Its signature was verified when it was saved; activation verifies it again.
        """
        path = self.manifest_path(name, version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise self._os_error(exc, "read", path) from None
        signed = SignedManifest.from_json(data)
        if (signed.manifest.name, signed.manifest.version) != (name, version):
            raise StoreError(f"{path} holds the manifest of {signed.manifest.label}; the file was moved")
        return signed

    def stored_versions(self) -> list[tuple[str, str]]:
        """(name, version) of every stored manifest, in natural order."""
        out = []
        for name in self._listdir(self.manifests_dir):
            for file in self._listdir(self.manifests_dir / name):
                version = file[: -len(".json")]
                if file.endswith(".json") and _is_name(name) and _is_name(version):
                    out.append((name, version))
        return sorted(out, key=lambda nv: (nv[0], version_order_key(nv[1])))

    def manifests(self) -> list[SignedManifest]:
        """Every readable stored manifest; unreadable ones are logged and skipped."""
        out = []
        for name, version in self.stored_versions():
            try:
                out.append(self.load_manifest(name, version))
            except (ArtifactError, OSError) as exc:
                log.warning("skipping unreadable manifest %s %s: %s", name, version, exc)
        return out

    # --- progress and completeness ------------------------------------------------------------

    def bitfield(self, manifest: Manifest) -> Bitfield:
        """Which chunks of `manifest` this store holds."""
        packed = self._packed()
        return Bitfield(len(manifest.chunks), (c.index for c in manifest.chunks
                                               if c.sha256 in packed or self.chunk_path(c.sha256).is_file()))

    def missing_chunks(self, manifest: Manifest) -> list[ChunkRef]:
        field = self.bitfield(manifest)
        return [manifest.chunks[i] for i in field.missing()]

    def is_complete(self, manifest: Manifest) -> bool:
        """True once the verified whole model of this version is in place."""
        path = self.model_path(manifest.name, manifest.version)
        try:
            return path.stat().st_size == manifest.size_bytes
        except FileNotFoundError:
            return False

    def status(self, manifest: Manifest) -> VersionStatus:
        field = self.bitfield(manifest)
        return VersionStatus(
            name=manifest.name, version=manifest.version, complete=self.is_complete(manifest),
            have_chunks=field.count(), total_chunks=len(manifest.chunks),
            bytes_have=sum(manifest.chunks[i].size_bytes for i in field.present()),
            size_bytes=manifest.size_bytes, digest=manifest.digest,
        )

    def versions(self) -> list[VersionStatus]:
        """Every stored version with its progress, for `mesh model ls`."""
        return [self.status(s.manifest) for s in self.manifests()]

    def complete_model_path(self, manifest: Manifest) -> Path:
        """Path of the complete model; IncompleteVersionError while it is still partial."""
        if not self.is_complete(manifest):
            missing = len(self.missing_chunks(manifest))
            raise IncompleteVersionError(
                f"{manifest.label} is not complete: {missing} of {len(manifest.chunks)} chunks missing"
                + ("" if missing else " (all chunks present: assemble it)")
            )
        return self.model_path(manifest.name, manifest.version)

    def assemble(self, manifest: Manifest) -> Path:
        """Write the whole model from its chunks, verify its SHA-256, and only then make it visible.

        Idempotent. Raises IncompleteVersionError while chunks are missing, StoreError on I/O
        errors or if the assembled bytes do not match the manifest (nothing is then left behind).
        """
        path = self.model_path(manifest.name, manifest.version)
        if self.is_complete(manifest):
            return path
        try:
            stored = self.load_manifest(manifest.name, manifest.version)
        except FileNotFoundError:
            raise StoreError(f"save the manifest of {manifest.label} before assembling it") from None
        if stored.digest != manifest.digest:
            raise ManifestConflictError(f"the stored manifest of {manifest.label} is a different one")
        missing = self.missing_chunks(manifest)
        if missing:
            raise IncompleteVersionError(
                f"{manifest.label} cannot be assembled: {len(missing)} of {len(manifest.chunks)} chunks "
                f"missing (first: chunk {missing[0].index})"
            )
        whole = hashlib.sha256()
        size = 0

        def pieces() -> Iterator[bytes]:
            nonlocal size
            for ref in manifest.chunks:
                data = self.read_chunk(ref.sha256)
                whole.update(data)
                size += len(data)
                yield data

        def check() -> None:
            if size != manifest.size_bytes or whole.hexdigest() != manifest.sha256:
                raise StoreError(
                    f"assembled {manifest.label} is {size} bytes with SHA-256 {whole.hexdigest()[:16]}..., "
                    f"but the manifest says {manifest.size_bytes} bytes, {manifest.sha256[:16]}...: "
                    "the manifest's chunk list does not describe its file; not activating it"
                )

        self._write_atomic(path, pieces(), f"model {manifest.label}", check=check)
        self._unpack(manifest)
        return path

    def _unpack(self, manifest: Manifest) -> int:
        """Remove the chunk files of a version whose complete model now holds them; bytes freed.
        Only chunks the index shows in this very model go. A crash midway leaves some as files
        too: harmless, GC removes them later."""
        path = self.model_path(manifest.name, manifest.version)
        packed = self._packed()
        freed = 0
        for ref in manifest.chunks:
            if (path, ref.offset, ref.size_bytes) in packed.get(ref.sha256, ()):
                freed += self._unlink(self.chunk_path(ref.sha256))
        return freed

    def verify_model(self, manifest: Manifest) -> bool:
        """Re-hash the complete model file (activation does this before loading it)."""
        path = self.complete_model_path(manifest)
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while block := f.read(_READ_BLOCK_BYTES):
                    digest.update(block)
        except OSError as exc:
            raise self._os_error(exc, "read", path) from None
        return digest.hexdigest() == manifest.sha256

    # --- garbage collection -------------------------------------------------------------------

    def collect(self, policy: Callable[[set[tuple[str, str]]], set[tuple[str, str]]], *, wait: bool = True
                ) -> tuple[set[tuple[str, str]], int]:
        """Under the store lock, list the stored versions, keep `policy(stored)` and sweep the rest;
        return (kept, bytes freed). A `mesh model publish` running meanwhile is waited for (or, with
        wait=False, BlockingIOError raised at once), so its version is never swept half-written."""
        with self.locked(wait=wait):
            kept = set(policy(set(self.stored_versions())))
            return kept, self.gc(kept)

    def gc(self, keep: Iterable[tuple[str, str]]) -> int:
        """Remove every version not in `keep` and every chunk no kept version needs; return bytes freed.

        The caller decides what to keep: the active version, the previous one (rollback),
        any version a rollout references and any download in progress. A node calls it through
        `collect`, which holds the store lock against a concurrent publish.
        """
        keep = set(keep)
        needed: set[str] = set()
        for name, version in keep:
            try:
                signed = self.load_manifest(name, version)
            except FileNotFoundError:
                continue
            except ArtifactError as exc:
                raise StoreError(
                    f"cannot collect garbage: kept version {name} {version} has an unreadable manifest "
                    f"({exc}); "
                    "its chunks would be lost"
                ) from None
            needed.update(c.sha256 for c in signed.manifest.chunks)
        def kept_model(path: Path) -> bool:
            return (path.parent.name, path.name[: -len(".tflite")]) in keep

        # Versions to drop, those that leave no needed chunk homeless first: on a full disk they
        # free the space the write-backs of the others need.
        packed = self._packed()
        homeless: dict[tuple[str, str], list[str]] = {}
        for name, version in self.stored_versions():
            if (name, version) in keep:
                continue
            model = self.model_path(name, version)
            homeless[(name, version)] = [
                sha for sha in needed
                if any(h[0] == model for h in packed.get(sha, ()))
                and not any(kept_model(h[0]) for h in packed[sha]) and not self.chunk_path(sha).is_file()]
        freed = 0
        for (name, version), shas in sorted(homeless.items(), key=lambda item: len(item[1])):
            for sha in shas:
                # A chunk a kept version needs, held only by models about to go: back to a chunk
                # file. If that fails (rotted, disk full) it is fetched again later.
                if self.chunk_path(sha).is_file():
                    continue
                try:
                    data = self._read_packed(sha)
                    self._write_atomic(self.chunk_path(sha), [data], f"chunk {sha[:16]}...")
                    freed -= len(data)
                except StoreError as exc:
                    log.warning("chunk %s... of a kept version is dropped with %s %s (%s); it will be "
                                "fetched again", sha[:16], name, version, exc)
            # Origin mark, then model, then manifest: neither a mark nor a complete model
            # outlives its manifest if the sweep is cut short.
            freed += self._unlink(self.origin_path(name, version))
            freed += self._unlink(self.model_path(name, version))
            freed += self._unlink(self.manifest_path(name, version))
        for name in self._listdir(self.manifests_dir):
            for file in self._listdir(self.manifests_dir / name):
                if file.endswith(ORIGIN_SUFFIX) and (name, file[: -len(ORIGIN_SUFFIX)]) not in keep:
                    freed += self._unlink(self.manifests_dir / name / file)
        for name in self._listdir(self.models_dir):
            for file in self._listdir(self.models_dir / name):
                if file.startswith(".") or not file.endswith(".tflite"):
                    continue
                if (name, file[: -len(".tflite")]) not in keep:
                    freed += self._unlink(self.models_dir / name / file)  # orphan: no manifest kept
        packed = self._packed()  # what the kept complete models hold now
        for sha in list(self.chunk_names()):
            if sha not in needed:
                freed += self._unlink(self.chunk_path(sha))
            elif sha in packed:  # left by a crash between assembling and unpacking: keep one copy
                try:
                    self._read_packed(sha)  # only if a model's copy is intact
                except StoreError:
                    continue
                freed += self._unlink(self.chunk_path(sha))
        for parent in (self.manifests_dir, self.models_dir):
            for name in self._listdir(parent):
                with contextlib.suppress(OSError):  # not empty
                    (parent / name).rmdir()
        return freed

    # --- file helpers -------------------------------------------------------------------------

    def _write_atomic(self, final: Path, pieces: Iterable[bytes | memoryview], what: str,
                      check: Callable[[], None] | None = None) -> None:
        """Write `pieces` to a temp file beside `final`, fsync, run `check`, rename, fsync the directory."""
        self._mkdir(final.parent)
        tmp = final.parent / f"{TMP_PREFIX}{final.name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            # Held until the file is renamed: tells a sweeper this temp file has a live writer.
            fcntl.flock(fd, fcntl.LOCK_EX)
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
            if check is not None:
                check()
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise self._os_error(exc, f"write {what} to", final) from None
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    def _os_error(self, exc: OSError, action: str, path: Path) -> StoreError:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = (f"free space on the disk holding {self.root} (the node already keeps only the newest "
                    "versions of each model; `mesh model ls` shows what is stored)")
        elif exc.errno == errno.EIO:
            hint = "the storage device reported an I/O error: check the disk"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = f"the node needs write access to {self.root}"
        else:
            hint = "complete versions are unaffected"
        return StoreError(f"cannot {action} {path}: {reason}; {hint}")

    def _mkdir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fsync_dir(directory.parent)
        except OSError as exc:
            raise self._os_error(exc, "create directory", directory) from None

    @staticmethod
    def _listdir(directory: Path) -> list[str]:
        try:
            return os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _unlink(self, path: Path) -> int:
        """Remove a file if present; return the bytes it held."""
        try:
            size = path.stat().st_size
            path.unlink()
            return size
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise self._os_error(exc, "remove", path) from None

    def _sweep_temp_files(self) -> int:
        """Remove temp files left by writers that died; return how many."""
        removed = 0
        for top in (self.chunks_dir, self.manifests_dir, self.models_dir):
            for sub in self._listdir(top):
                for name in self._listdir(top / sub):
                    if name.startswith(TMP_PREFIX) and self._remove_if_abandoned(top / sub / name):
                        removed += 1
        if removed:
            log.info("removed %d temp files left by an interrupted write under %s", removed, self.root)
        return removed

    @staticmethod
    def _remove_if_abandoned(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False  # renamed or removed meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live writer holds it
            # Only unlink the file we locked, not one that replaced it under the same name.
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                return False
            os.unlink(path)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
