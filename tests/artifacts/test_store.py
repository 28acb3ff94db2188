"""The on-disk artifact store: verified chunks, atomic writes, resume, full disks and gc."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from mesh.artifacts import (
    ArtifactStore,
    BadChunkError,
    ChunkParams,
    IncompleteVersionError,
    ManifestConflictError,
    ManifestSignatureError,
    MissingChunkError,
    SignedManifest,
    StoreError,
    sign_manifest,
)
from mesh.artifacts.publish import publish
from mesh.artifacts.store import TMP_PREFIX
from mesh.identity.signing import KeyRole, SigningKey, TrustedKeys
from tests.models import REPO, mediapipe_model, wakeword_model

KIB = 1024
PUBLISHER = SigningKey.generate(KeyRole.PUBLISHER)
TRUST = TrustedKeys([PUBLISHER.verify_key])
SMALL = ChunkParams(avg_size_bytes=8 * KIB)


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> tuple[ArtifactStore, dict[str, SignedManifest]]:
    """A publisher's store holding a few real models, cut small so they have many chunks."""
    store = ArtifactStore(tmp_path_factory.mktemp("origin"))
    published = {
        "okay-nabu": publish(wakeword_model("okay_nabu"), name="okay-nabu", version="1.0", key=PUBLISHER,
                             store=store, params=SMALL),
        "hey-jarvis": publish(wakeword_model("hey_jarvis"), name="hey-jarvis", version="1.0", key=PUBLISHER,
                              store=store, params=SMALL),
        "hand": publish(mediapipe_model("hand_landmark_full"), name="hand-landmark", version="1.0",
                        key=PUBLISHER, store=store, params=ChunkParams(avg_size_bytes=16 * KIB)),
    }
    return store, published


def copy_version(src: ArtifactStore, dst: ArtifactStore, signed: SignedManifest, indices=None) -> None:
    """What a transfer does: save the verified manifest, then store chunks one by one."""
    manifest = dst.save_manifest(signed, trusted=TRUST)
    for i in range(len(manifest.chunks)) if indices is None else indices:
        dst.put_manifest_chunk(manifest, i, src.read_chunk(manifest.chunks[i].sha256))


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"{TMP_PREFIX}*")]


# --- chunks ---------------------------------------------------------------------------------

def test_chunks_are_verified_before_they_are_stored(tmp_path, origin):
    src, published = origin
    manifest = published["okay-nabu"].manifest
    store = ArtifactStore(tmp_path)
    data = b"model bytes"
    sha = hashlib.sha256(data).hexdigest()
    assert store.put_chunk(sha, data) == tmp_path / "chunks" / sha[:2] / sha
    assert store.read_chunk(sha) == data and store.has_chunk(sha)
    with pytest.raises(BadChunkError, match="refusing to store"):
        store.put_chunk("0" * 64, data)
    assert not store.has_chunk("0" * 64)
    good = src.read_chunk(manifest.chunks[1].sha256)
    with pytest.raises(BadChunkError, match="chunk 2 of okay-nabu 1.0 is .* bytes, got"):
        store.put_manifest_chunk(manifest, 2, good)
    with pytest.raises(BadChunkError, match="chunk 1 of okay-nabu 1.0 hashes to"):
        store.put_manifest_chunk(manifest, 1, bytes(len(good)))
    with pytest.raises(BadChunkError, match="has chunks 0.."):
        store.put_manifest_chunk(manifest, len(manifest.chunks), good)
    with pytest.raises(BadChunkError, match="not a SHA-256"):
        store.chunk_path("../../etc/passwd")
    assert list(store.chunk_names()) == [sha]
    with pytest.raises(MissingChunkError, match="not in the store"):
        store.read_chunk("1" * 64)


def test_a_chunk_that_rots_on_disk_is_dropped_and_refetched(tmp_path, origin):
    src, published = origin
    store = ArtifactStore(tmp_path)
    copy_version(src, store, published["okay-nabu"])
    manifest = published["okay-nabu"].manifest
    path = store.chunk_path(manifest.chunks[0].sha256)
    path.write_bytes(b"bit rot")
    with pytest.raises(BadChunkError, match="no longer matches"):
        store.read_chunk(manifest.chunks[0].sha256)
    assert list(store.bitfield(manifest).missing()) == [0]


# --- manifests ------------------------------------------------------------------------------

def test_only_manifests_of_a_trusted_publisher_are_stored(tmp_path, origin):
    _, published = origin
    store = ArtifactStore(tmp_path)
    node = SigningKey.generate(KeyRole.NODE)
    with pytest.raises(ManifestSignatureError, match="not a fleet publisher key"):
        store.save_manifest(published["okay-nabu"], trusted=TrustedKeys([node.verify_key]))
    assert store.stored_versions() == [] and not list((tmp_path / "manifests").rglob("*"))


def test_a_version_is_immutable(tmp_path, origin):
    _, published = origin
    store = ArtifactStore(tmp_path)
    signed = published["okay-nabu"]
    store.save_manifest(signed, trusted=TRUST)
    store.save_manifest(signed, trusted=TRUST)  # the same again: fine
    other = sign_manifest(dataclasses.replace(signed.manifest, created_at="2027-01-01T00:00:00Z"), PUBLISHER)
    with pytest.raises(ManifestConflictError, match="okay-nabu 1.0 is already stored .* publish a new"):
        store.save_manifest(other, trusted=TRUST)
    assert store.load_manifest("okay-nabu", "1.0") == signed


def test_versions_are_listed_in_natural_order(tmp_path, origin):
    _, published = origin
    store = ArtifactStore(tmp_path)
    base = published["okay-nabu"].manifest
    for version in ("1.10", "1.9", "1.2", "2.0"):
        signed = sign_manifest(dataclasses.replace(base, version=version), PUBLISHER)
        store.save_manifest(signed, trusted=TRUST)
    assert [(v.name, v.version) for v in store.versions()] == [
        ("okay-nabu", "1.2"), ("okay-nabu", "1.9"), ("okay-nabu", "1.10"), ("okay-nabu", "2.0")]


# --- resume and completeness ----------------------------------------------------------------

def test_resume_keeps_verified_chunks_and_never_shows_a_partial_version_as_complete(tmp_path, origin):
    src, published = origin
    signed = published["okay-nabu"]
    manifest = signed.manifest
    total = len(manifest.chunks)
    assert total >= 6
    first_half = list(range(0, total, 2))
    copy_version(src, ArtifactStore(tmp_path), signed, first_half)

    store = ArtifactStore(tmp_path)  # the node restarted
    field = store.bitfield(manifest)
    assert list(field.present()) == first_half
    [status] = store.versions()
    assert not status.complete
    assert (status.have_chunks, status.total_chunks) == (len(first_half), total)
    assert status.bytes_have == sum(manifest.chunks[i].size_bytes for i in first_half)
    with pytest.raises(IncompleteVersionError, match=f"{total - len(first_half)} of {total} chunks missing"):
        store.assemble(manifest)
    with pytest.raises(IncompleteVersionError):
        store.complete_model_path(manifest)
    assert not list((tmp_path / "models").rglob("*.tflite"))

    copy_version(src, store, signed, list(field.missing()))
    assert not store.is_complete(manifest)  # every chunk present is not yet a complete version
    path = store.assemble(manifest)
    assert store.is_complete(manifest) and store.verify_model(manifest)
    assert path.read_bytes() == wakeword_model("okay_nabu").read_bytes()
    assert store.complete_model_path(manifest) == path
    assert store.assemble(manifest) == path  # idempotent


def test_assemble_checks_the_whole_file_hash(tmp_path, origin):
    src, published = origin
    good = published["okay-nabu"].manifest
    lying = sign_manifest(dataclasses.replace(good, version="1.1", sha256="ab" * 32), PUBLISHER)
    store = ArtifactStore(tmp_path)
    copy_version(src, store, lying)
    with pytest.raises(StoreError, match="does not describe its file"):
        store.assemble(lying.manifest)
    assert not store.is_complete(lying.manifest)
    assert temp_files(tmp_path) == []


def test_assemble_needs_the_manifest_saved_first(tmp_path, origin):
    _, published = origin
    with pytest.raises(StoreError, match="save the manifest"):
        ArtifactStore(tmp_path).assemble(published["okay-nabu"].manifest)


# --- crashes --------------------------------------------------------------------------------

def test_leftover_temp_files_are_never_listed_and_are_removed_on_open(tmp_path, origin):
    src, published = origin
    signed = published["okay-nabu"]
    manifest = signed.manifest
    store = ArtifactStore(tmp_path)
    copy_version(src, store, signed, [0])
    sha = manifest.chunks[1].sha256
    # What a writer killed mid-write leaves behind: half a chunk, half a model, half a manifest.
    (tmp_path / "chunks" / sha[:2]).mkdir(exist_ok=True)
    leftovers = [
        tmp_path / "chunks" / sha[:2] / f"{TMP_PREFIX}{sha}.4242.deadbeef",
        tmp_path / "models" / "okay-nabu" / f"{TMP_PREFIX}1.0.tflite.4242.deadbeef",
        tmp_path / "manifests" / "okay-nabu" / f"{TMP_PREFIX}2.0.json.4242.deadbeef",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert not store.has_chunk(sha) and sha not in set(store.chunk_names())
    assert [(v.version, v.complete, v.have_chunks) for v in store.versions()] == [("1.0", False, 1)]

    reopened = ArtifactStore(tmp_path)
    assert reopened.removed_temp_files == 3
    assert temp_files(tmp_path) == []
    assert list(reopened.bitfield(manifest).present()) == [0]


CHILD = textwrap.dedent("""
    import hashlib, os, stat, sys, time
    from pathlib import Path
    from mesh.artifacts.store import ArtifactStore

    store = ArtifactStore(Path(sys.argv[1]))
    real_fsync = os.fsync
    def hang(fd):  # stands for a slow disk: the process dies before the rename
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return real_fsync(fd)
        print("writing", flush=True)
        time.sleep(60)
    os.fsync = hang
    data = b"x" * 100_000
    store.put_chunk(hashlib.sha256(data).hexdigest(), data)
""")


def test_a_writer_killed_mid_write_leaves_nothing_under_a_final_name(tmp_path):
    sha = hashlib.sha256(b"x" * 100_000).hexdigest()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        [tmp] = temp_files(tmp_path)
        assert tmp.parent == tmp_path / "chunks" / sha[:2]
        live = ArtifactStore(tmp_path)  # e.g. `mesh model ls` while the node writes
        assert live.removed_temp_files == 0 and tmp.exists()  # a live writer's file is left alone
        assert not live.has_chunk(sha)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
    after = ArtifactStore(tmp_path)
    assert after.removed_temp_files == 1
    assert temp_files(tmp_path) == [] and not after.has_chunk(sha)


# --- full disks and I/O errors --------------------------------------------------------------

def test_disk_full_during_transfer_fails_cleanly_and_keeps_complete_versions(tiny_disk, origin):
    src, published = origin
    root = tiny_disk(512) / "artifacts"
    store = ArtifactStore(root)
    copy_version(src, store, published["okay-nabu"])  # 80 KB of chunks
    nabu = published["okay-nabu"].manifest
    store.assemble(nabu)  # + 80 KB model

    hand = published["hand"].manifest  # 5.5 MB: cannot fit
    store.save_manifest(published["hand"], trusted=TRUST)
    stored = 0
    with pytest.raises(StoreError) as info:
        for ref in hand.chunks:
            store.put_manifest_chunk(hand, ref.index, src.read_chunk(ref.sha256))
            stored += 1
    message = str(info.value)
    assert "No space left on device" in message and str(root) in message and "mesh model ls" in message
    assert stored >= 1, stored  # some chunks made it before the disk filled up
    assert temp_files(root) == []
    assert store.is_complete(nabu) and store.verify_model(nabu)

    reopened = ArtifactStore(root)
    by_name = {v.name: v for v in reopened.versions()}
    assert by_name["okay-nabu"].complete
    assert not by_name["hand-landmark"].complete and by_name["hand-landmark"].have_chunks == stored
    assert reopened.gc({("okay-nabu", "1.0")}) > 0
    assert [v.name for v in reopened.versions()] == ["okay-nabu"]


def test_disk_full_while_assembling_leaves_no_half_model(tiny_disk, origin):
    src, published = origin
    root = tiny_disk(256) / "artifacts"
    store = ArtifactStore(root)
    nabu, jarvis = published["okay-nabu"].manifest, published["hey-jarvis"].manifest
    copy_version(src, store, published["okay-nabu"])  # 80 KB
    store.assemble(nabu)  # 80 KB, then its chunk files go
    assert not any(store.chunk_path(c.sha256).exists() for c in nabu.chunks)
    copy_version(src, store, published["hey-jarvis"])  # 52 KB of chunks
    stat = os.statvfs(root)
    # Leave room for less than the assembled model: the chunks are in, the whole file is not.
    (root.parent / "filler").write_bytes(bytes(stat.f_bavail * stat.f_frsize - jarvis.size_bytes // 2))
    with pytest.raises(StoreError, match=f"cannot write model hey-jarvis 1.0 to .*{jarvis.version}.tflite: "
                                         "No space left on device"):
        store.assemble(jarvis)
    assert temp_files(root) == []
    assert not store.is_complete(jarvis) and store.bitfield(jarvis).complete
    assert store.verify_model(nabu)


@pytest.mark.parametrize("code,hint", [(errno.EIO, "I/O error: check the disk"),
                                       (errno.ENOSPC, "free space on the disk")])
def test_injected_write_error_fails_cleanly(tmp_path, origin, monkeypatch, code, hint):
    src, published = origin
    store = ArtifactStore(tmp_path)
    copy_version(src, store, published["okay-nabu"])
    store.assemble(published["okay-nabu"].manifest)
    jarvis = published["hey-jarvis"]
    store.save_manifest(jarvis, trusted=TRUST)

    def failing_write(fd, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("mesh.artifacts.store.os.write", failing_write)
    with pytest.raises(StoreError, match=hint) as info:
        store.put_manifest_chunk(jarvis.manifest, 0, src.read_chunk(jarvis.manifest.chunks[0].sha256))
    assert str(store.chunk_path(jarvis.manifest.chunks[0].sha256)) in str(info.value)
    monkeypatch.undo()
    assert temp_files(tmp_path) == []
    assert not store.bitfield(jarvis.manifest).get(0)
    assert store.verify_model(published["okay-nabu"].manifest)


# --- garbage collection ---------------------------------------------------------------------

def test_gc_keeps_what_is_asked_and_drops_chunks_nobody_needs(tmp_path, origin):
    src, published = origin
    store = ArtifactStore(tmp_path)
    nabu, jarvis = published["okay-nabu"], published["hey-jarvis"]
    nabu_old = sign_manifest(dataclasses.replace(nabu.manifest, version="0.9"), PUBLISHER)  # same chunks
    for signed in (nabu, jarvis, nabu_old):
        copy_version(src, store, signed)
        store.assemble(signed.manifest)
    jarvis_bytes = jarvis.manifest.size_bytes
    jarvis_chunks = {c.sha256 for c in jarvis.manifest.chunks} - {c.sha256 for c in nabu.manifest.chunks}

    freed = store.gc({("okay-nabu", "1.0"), ("okay-nabu", "0.9"), ("never", "stored")})
    assert freed >= jarvis_bytes  # the model (its chunk files went when it was assembled)
    assert [(v.name, v.version, v.complete) for v in store.versions()] == [
        ("okay-nabu", "0.9", True), ("okay-nabu", "1.0", True)]
    assert not any(store.has_chunk(sha) for sha in jarvis_chunks)
    assert not (tmp_path / "manifests" / "hey-jarvis").exists()

    freed = store.gc({("okay-nabu", "1.0")})
    assert freed >= nabu.manifest.size_bytes  # 0.9's model; its chunks are shared with 1.0
    assert store.bitfield(nabu.manifest).complete and store.verify_model(nabu.manifest)
    assert store.gc({("okay-nabu", "1.0")}) == 0


def test_gc_refuses_when_a_kept_manifest_is_unreadable(tmp_path, origin):
    src, published = origin
    store = ArtifactStore(tmp_path)
    copy_version(src, store, published["okay-nabu"])
    store.manifest_path("okay-nabu", "1.0").write_bytes(b"{")
    with pytest.raises(StoreError, match="unreadable manifest"):
        store.gc({("okay-nabu", "1.0")})
    assert store.bitfield(published["okay-nabu"].manifest).complete


def test_stray_files_do_not_break_listing_or_gc(tmp_path, origin):
    src, published = origin
    store = ArtifactStore(tmp_path)
    copy_version(src, store, published["okay-nabu"])
    (tmp_path / "manifests" / "bad name").mkdir()
    (tmp_path / "manifests" / "bad name" / "1.json").write_text("{}")
    (tmp_path / "manifests" / "okay-nabu" / "notes.txt").write_text("hi")
    (tmp_path / "manifests" / "okay-nabu" / "2.0.json").write_text("not json")
    (tmp_path / "chunks" / "zz").mkdir()
    (tmp_path / "chunks" / "zz" / "README").write_text("hi")
    assert [(v.name, v.version) for v in store.versions()] == [("okay-nabu", "1.0")]
    store.gc({("okay-nabu", "1.0")})
    assert store.bitfield(published["okay-nabu"].manifest).complete
    assert not (tmp_path / "manifests" / "okay-nabu" / "2.0.json").exists()


def test_published_versions_are_marked_as_originating_here_and_the_mark_survives_reopen(tmp_path, origin):
    src, published = origin
    store = ArtifactStore(tmp_path)
    publish(wakeword_model("okay_nabu"), name="okay-nabu", version="1.0", key=PUBLISHER, store=store,
            params=SMALL)
    copy_version(src, store, published["hey-jarvis"])  # received from a peer: not ours
    store.assemble(published["hey-jarvis"].manifest)
    reopened = ArtifactStore(tmp_path)
    assert reopened.is_origin("okay-nabu", "1.0") and not reopened.is_origin("hey-jarvis", "1.0")
    assert [(v.name, v.version) for v in reopened.versions()] == [("hey-jarvis", "1.0"), ("okay-nabu", "1.0")]
    reopened.gc({("hey-jarvis", "1.0")})
    assert not reopened.is_origin("okay-nabu", "1.0")
    assert not list((tmp_path / "manifests").rglob("*.origin"))


def test_gc_waits_for_a_publish_in_progress_and_keeps_its_version(tmp_path, origin):
    """`mesh model publish` writes into a running node's store from another process. The node's sweep
    must not list the versions before the manifest lands and then delete the new chunks as garbage."""
    src, published = origin
    store = ArtifactStore(tmp_path)
    old, new = published["okay-nabu"], published["hey-jarvis"]
    copy_version(src, store, old)
    store.assemble(old.manifest)
    offered: list[set] = []
    result: list = []
    swept = threading.Event()

    def sweep():
        result.append(store.collect(lambda stored: offered.append(set(stored)) or set(stored)))
        swept.set()

    with store.locked():  # what publish holds while it writes
        sweeper = threading.Thread(target=sweep)
        sweeper.start()
        copy_version(src, store, new)
        store.assemble(new.manifest)
        assert not swept.is_set(), "the sweep ran while a publish held the store"
    sweeper.join(timeout=30)
    assert swept.is_set()
    assert offered == [{("okay-nabu", "1.0"), ("hey-jarvis", "1.0")}]
    assert result[0] == ({("okay-nabu", "1.0"), ("hey-jarvis", "1.0")}, 0)
    assert store.is_complete(new.manifest) and store.verify_model(new.manifest)


def test_a_sweep_that_must_not_wait_gives_way_to_a_publish(tmp_path, origin):
    src, published = origin
    store = ArtifactStore(tmp_path)
    copy_version(src, store, published["okay-nabu"])
    with store.locked(), pytest.raises(BlockingIOError):
        store.collect(lambda stored: set(), wait=False)
    assert store.bitfield(published["okay-nabu"].manifest).complete  # nothing was swept
    assert store.collect(lambda stored: set(), wait=False)[1] > 0


def test_only_the_newest_version_published_here_decides_the_next_chunking(tmp_path, origin):
    src, published = origin
    store = ArtifactStore(tmp_path)
    publish(wakeword_model("okay_nabu"), name="okay-nabu", version="0.9", key=PUBLISHER, store=store,
            params=SMALL)
    assert store.published_chunking("okay-nabu") == ("0.9", SMALL)
    copy_version(src, store, published["okay-nabu"])  # 1.0, received from a peer: does not count
    assert store.published_chunking("okay-nabu") == ("0.9", SMALL)
    store.mark_origin("okay-nabu", "1.0")  # ours, but its chunking was not recorded
    assert store.published_chunking("okay-nabu") is None  # not 0.9's: 1.0 may have been cut otherwise


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "chunks").rglob("*") if p.is_file()) + \
        sum(p.stat().st_size for p in (root / "models").rglob("*") if p.is_file())


def test_a_complete_version_is_stored_once_and_its_chunks_are_served_from_the_model(tmp_path, origin):
    src, published = origin
    store = ArtifactStore(tmp_path)
    hand = published["hand"].manifest
    copy_version(src, store, published["hand"])
    assert store_bytes(tmp_path) == hand.size_bytes  # chunk files only
    store.assemble(hand)
    assert store_bytes(tmp_path) == hand.size_bytes  # the model only, not both
    assert list(store.chunk_names()) == []
    assert store.bitfield(hand).complete and store.verify_model(hand)
    for ref in hand.chunks[::7]:
        assert store.read_chunk(ref.sha256) == src.read_chunk(ref.sha256)
    assert ArtifactStore(tmp_path).bitfield(hand).complete  # and after a restart


def two_versions_sharing_chunks(tmp_path, src, published):
    """okay-nabu 1.0 and 2.0 (the same file, so every chunk shared), both complete."""
    store = ArtifactStore(tmp_path)
    v1 = published["okay-nabu"]
    v2 = sign_manifest(dataclasses.replace(v1.manifest, version="2.0"), PUBLISHER)
    for signed in (v1, v2):
        copy_version(src, store, signed)
        store.assemble(signed.manifest)
    return store, v1.manifest, v2.manifest


def test_gc_of_a_version_sharing_chunks_with_a_kept_model_writes_nothing_back(tmp_path, origin, monkeypatch):
    src, published = origin
    store, v1, v2 = two_versions_sharing_chunks(tmp_path, src, published)
    writes = []
    real = ArtifactStore._write_atomic
    monkeypatch.setattr(ArtifactStore, "_write_atomic",
                        lambda self, final, *a, **k: (writes.append(final), real(self, final, *a, **k)))
    freed = store.gc({("okay-nabu", "2.0")})
    assert writes == [] and list(store.chunk_names()) == []
    assert v1.size_bytes <= freed < v1.size_bytes + 8192  # the model and its manifest, nothing counted twice
    assert store.verify_model(v2) and store.bitfield(v2).complete


def test_gc_frees_space_on_a_full_disk(tiny_disk, origin):
    src, published = origin
    root = tiny_disk(512) / "artifacts"
    store, v1, v2 = two_versions_sharing_chunks(root, src, published)
    stat = os.statvfs(root)
    (root.parent / "filler").write_bytes(bytes(stat.f_bavail * stat.f_frsize))  # not a byte left
    assert store.gc({("okay-nabu", "2.0")}) >= v1.size_bytes
    assert not store.is_complete(v1) and store.verify_model(v2)


def test_a_rotted_copy_of_a_chunk_is_read_from_another_model_or_shown_missing(tmp_path, origin):
    src, published = origin
    store, v1, v2 = two_versions_sharing_chunks(tmp_path, src, published)
    ref = v1.chunks[1]
    for manifest in (v1, v2):
        path = store.model_path(manifest.name, manifest.version)
        data = bytearray(path.read_bytes())
        data[ref.offset + 10] ^= 0xFF
        path.write_bytes(bytes(data))
        if manifest is v1:  # 2.0 still holds a good copy
            assert store.read_chunk(ref.sha256) == src.read_chunk(ref.sha256)
    with pytest.raises(BadChunkError, match="no longer matches its hash"):
        store.read_chunk(ref.sha256)
    # Both copies rotted: the chunk shows missing, so a version needing it fetches it again.
    assert list(store.bitfield(v2).missing()) == [ref.index]
    store.put_manifest_chunk(v2, ref.index, src.read_chunk(ref.sha256))
    assert store.read_chunk(ref.sha256) == src.read_chunk(ref.sha256)


def test_gc_writes_back_the_chunks_a_kept_download_needs_before_removing_their_model(tmp_path, origin):
    src, published = origin
    store = ArtifactStore(tmp_path)
    nabu = published["okay-nabu"]
    copy_version(src, store, nabu)
    store.assemble(nabu.manifest)
    # 0.9: the same chunks, being downloaded; it needs nothing: 1.0's model holds them all.
    older = sign_manifest(dataclasses.replace(nabu.manifest, version="0.9"), PUBLISHER)
    store.save_manifest(older, trusted=TRUST)
    assert store.bitfield(older.manifest).complete and not store.is_complete(older.manifest)
    store.gc({("okay-nabu", "0.9")})  # 1.0 goes; 0.9 must not lose its chunks with it
    assert not store.is_complete(nabu.manifest)
    assert store.bitfield(older.manifest).complete
    store.assemble(older.manifest)
    assert store.verify_model(older.manifest) and list(store.chunk_names()) == []


def test_a_model_that_rots_on_disk_serves_no_bad_chunk(tmp_path, origin):
    src, published = origin
    store = ArtifactStore(tmp_path)
    nabu = published["okay-nabu"].manifest
    copy_version(src, store, published["okay-nabu"])
    store.assemble(nabu)
    ref = nabu.chunks[1]
    path = store.model_path(nabu.name, nabu.version)
    data = bytearray(path.read_bytes())
    data[ref.offset + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BadChunkError, match="no longer matches its hash"):
        store.read_chunk(ref.sha256)
    assert store.read_chunk(nabu.chunks[0].sha256) == src.read_chunk(nabu.chunks[0].sha256)
    assert not store.verify_model(nabu)  # and activation refuses the file


def test_a_chunk_a_complete_model_holds_is_not_stored_again(tmp_path, origin):
    src, published = origin
    store, v1, v2 = two_versions_sharing_chunks(tmp_path, src, published)
    v3 = sign_manifest(dataclasses.replace(v1, version="3.0"), PUBLISHER)
    store.save_manifest(v3, trusted=TRUST)
    # Say, a peer sent it anyway.
    store.put_manifest_chunk(v3.manifest, 0, src.read_chunk(v1.chunks[0].sha256))
    assert list(store.chunk_names()) == []
    assert store.bitfield(v3.manifest).complete


def test_chunk_files_go_only_once_a_model_holding_them_is_in_place(tmp_path, origin):
    """The files are the only copy until the model is assembled and indexed: unpacking a version
    whose model is not (or not yet) in place removes nothing."""
    src, published = origin
    store = ArtifactStore(tmp_path)
    nabu = published["okay-nabu"].manifest
    copy_version(src, store, published["okay-nabu"])
    assert store._unpack(nabu) == 0
    assert sorted(store.chunk_names()) == sorted({c.sha256 for c in nabu.chunks})
