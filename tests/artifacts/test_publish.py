"""`mesh model publish` end to end on real models, and deltas between versions."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.artifacts import (
    ArtifactStore,
    ChunkParams,
    ManifestConflictError,
    SignedManifest,
    StoreError,
    verify_manifest,
)
from mesh.artifacts.publish import PublishError, delta, publish
from mesh.identity.signing import KeyRole, SigningKey, TrustedKeys
from mesh.inference.backend import inspect_model
from tests.models import WAKEWORD_NAMES, mediapipe_model, wakeword_model

PUBLISHER = SigningKey.generate(KeyRole.PUBLISHER)
TRUST = TrustedKeys([PUBLISHER.verify_key])
WHEN = "2026-11-29T04:00:00Z"


@pytest.mark.parametrize("model", WAKEWORD_NAMES)
def test_publish_int8_wakeword_models(tmp_path, model):
    path = wakeword_model(model)
    store = ArtifactStore(tmp_path)
    signed = publish(path, name=model.replace("_", "-"), version="1.0", key=PUBLISHER, store=store,
                     params=ChunkParams(avg_size_bytes=8 * 1024), created_at=WHEN)
    manifest = verify_manifest(SignedManifest.from_json(signed.to_json()), TRUST)
    assert manifest.signature == inspect_model(path)
    assert manifest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest.publisher_key_id == PUBLISHER.key_id and manifest.min_runtime_version == "2.3.0"
    [status] = store.versions()
    assert status.complete and status.have_chunks == status.total_chunks == len(manifest.chunks) > 1
    assert store.verify_model(manifest)
    assert store.load_manifest(manifest.name, "1.0") == signed


def test_publish_hand_landmark_with_default_chunks(tmp_path):
    path = mediapipe_model("hand_landmark_full")
    store = ArtifactStore(tmp_path)
    signed = publish(path, name="hand-landmark", version="2.1", key=PUBLISHER, store=store)
    manifest = signed.manifest
    assert manifest.size_bytes == path.stat().st_size
    assert 10 <= len(manifest.chunks) <= 40  # ~300 KiB each at the 256 KiB target
    assert manifest.signature.inputs[0].shape == (1, 224, 224, 3)
    assert store.complete_model_path(manifest).read_bytes() == path.read_bytes()
    assert len(signed.to_json()) < 8 * 1024


def test_republishing_the_same_bytes_is_idempotent_but_a_version_cannot_change(tmp_path):
    store = ArtifactStore(tmp_path)
    first = publish(wakeword_model("alexa"), name="wake", version="1.0", key=PUBLISHER, store=store,
                    created_at=WHEN)
    again = publish(wakeword_model("alexa"), name="wake", version="1.0", key=PUBLISHER, store=store,
                    created_at=WHEN)
    assert again == first
    with pytest.raises(ManifestConflictError, match="wake 1.0 is already stored"):
        publish(wakeword_model("hey_mycroft"), name="wake", version="1.0", key=PUBLISHER, store=store,
                created_at=WHEN)
    assert store.verify_model(first.manifest)


def test_refuses_files_that_are_not_loadable_models(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    text = tmp_path / "notes.tflite"
    text.write_text("not a model at all")
    with pytest.raises(PublishError, match="is not a .tflite model"):
        publish(text, name="m", version="1", key=PUBLISHER, store=store)
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(wakeword_model("alexa").read_bytes()[:4096])
    with pytest.raises(PublishError, match="does not load in the TFLite runtime"):
        publish(truncated, name="m", version="1", key=PUBLISHER, store=store)
    with pytest.raises(PublishError, match="cannot read .*missing.tflite"):
        publish(tmp_path / "missing.tflite", name="m", version="1", key=PUBLISHER, store=store)
    assert store.versions() == [] and list(store.chunk_names()) == []


def test_refuses_bad_names_and_non_publisher_keys(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(PublishError, match="model name '../x' is not allowed"):
        publish(wakeword_model(), name="../x", version="1", key=PUBLISHER, store=store)
    with pytest.raises(PublishError, match="version of m '1 2' is not allowed"):
        publish(wakeword_model(), name="m", version="1 2", key=PUBLISHER, store=store)
    node = SigningKey.generate(KeyRole.NODE)
    with pytest.raises(PublishError, match=f"key {node.key_id} is a node key"):
        publish(wakeword_model(), name="m", version="1", key=node, store=store)
    with pytest.raises(PublishError, match="min_runtime_version"):
        publish(wakeword_model(), name="m", version="1", key=PUBLISHER, store=store,
                min_runtime_version="new")


def changed_tail(path: Path, out: Path) -> Path:
    """`path` with 16 KiB of weights near the end zeroed (it still loads), written to `out`."""
    data = bytearray(path.read_bytes())
    at = len(data) - 100_000
    data[at:at + 16 * 1024] = bytes(16 * 1024)
    out.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory) -> tuple[ArtifactStore, SignedManifest, SignedManifest]:
    """hand_landmark_full as 1.0, and as 1.1 with 16 KiB of weights near the end changed (still loads)."""
    work = tmp_path_factory.mktemp("versions")
    v1 = mediapipe_model("hand_landmark_full")
    v2 = changed_tail(v1, work / "hand_landmark_full_v2.tflite")
    origin = ArtifactStore(work / "origin")
    return (origin, publish(v1, name="hand-landmark", version="1.0", key=PUBLISHER, store=origin),
            publish(v2, name="hand-landmark", version="1.1", key=PUBLISHER, store=origin))


def test_delta_of_a_changed_tail_is_the_last_few_chunks(two_versions):
    _, old, new = two_versions
    needed = delta(old.manifest, new.manifest)
    assert 1 <= len(needed) <= 3, [c.index for c in needed]
    assert all(c.index >= len(new.manifest.chunks) - 3 for c in needed)
    assert sum(c.size_bytes for c in needed) < new.manifest.size_bytes // 4
    assert delta(None, new.manifest) == list(new.manifest.chunks)  # chunks here are all distinct
    assert delta(new.manifest, new.manifest) == []


def test_a_node_holding_the_old_version_fetches_only_the_delta(tmp_path, two_versions):
    origin, old, new = two_versions
    node = ArtifactStore(tmp_path)
    for signed in (old, new):
        node.save_manifest(signed, trusted=TRUST)
    for ref in old.manifest.chunks:
        node.put_manifest_chunk(old.manifest, ref.index, origin.read_chunk(ref.sha256))
    node.assemble(old.manifest)

    missing = node.missing_chunks(new.manifest)
    assert {c.sha256 for c in missing} == {c.sha256 for c in delta(old.manifest, new.manifest)}
    assert node.status(new.manifest).have_chunks == len(new.manifest.chunks) - len(missing)
    fetched = 0
    for ref in missing:
        node.put_manifest_chunk(new.manifest, ref.index, origin.read_chunk(ref.sha256))
        fetched += ref.size_bytes
    assert fetched < new.manifest.size_bytes // 4
    path = node.assemble(new.manifest)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == new.manifest.sha256
    assert [(v.version, v.complete) for v in node.versions()] == [("1.0", True), ("1.1", True)]



def test_a_new_version_is_chunked_like_the_last_one_published_here(tmp_path):
    """Chunk cuts depend on the parameters: a v2 cut with other parameters shares nothing with v1,
    so peers would fetch all of it. Without --chunk-kib, publish reuses the previous version's."""
    v1, v2 = mediapipe_model("hand_landmark_full"), changed_tail(mediapipe_model("hand_landmark_full"),
                                                                 tmp_path / "v2.tflite")
    store = ArtifactStore(tmp_path / "origin")
    first = publish(v1, name="hand", version="1.0", key=PUBLISHER, store=store,
                    params=ChunkParams(avg_size_bytes=64 * 1024)).manifest
    second = publish(v2, name="hand", version="1.1", key=PUBLISHER, store=store).manifest
    to_fetch = sum(c.size_bytes for c in delta(first, second))
    assert to_fetch < second.size_bytes // 10, to_fetch
    assert store.published_chunking("hand") == ("1.1", ChunkParams(avg_size_bytes=64 * 1024))
    # The same v2 cut with the defaults (what happened before parameters were remembered):
    fresh = publish(v2, name="hand", version="1.1", key=PUBLISHER,
                    store=ArtifactStore(tmp_path / "other")).manifest
    assert sum(c.size_bytes for c in delta(first, fresh)) > second.size_bytes // 2


def test_cli_says_which_chunking_a_version_got(tmp_path, fleet):
    mesh = [sys.executable, "-m", "mesh", "model", "publish", "--key", str(fleet.directory / "publisher.key"),
            "--data-dir", str(tmp_path / "d"), "--json", "--name", "nabu"]
    model = wakeword_model("okay_nabu")
    runs = [subprocess.run([*mesh, str(model), "--version", version, *extra], capture_output=True, text=True)
            for version, extra in (("1", ["--chunk-kib", "64"]), ("2", []), ("3", ["--chunk-kib", "128"]))]
    for run in runs:
        assert run.returncode == 0, run.stderr
    got = [json.loads(run.stdout) for run in runs]
    assert [(g["chunk_avg_bytes"], g["chunking_from"]) for g in got] == [
        (65536, None), (65536, "1"), (131072, None)]


def test_a_publish_cut_short_is_finished_by_running_it_again(tmp_path, monkeypatch):
    """Killed (here: failing) after its manifest and one chunk, a publish run again with the same file
    completes the version, instead of refusing it as a changed version, and the node is its origin."""
    store = ArtifactStore(tmp_path)
    model = mediapipe_model("face_detection_short_range")
    real_put = ArtifactStore.put_manifest_chunk
    calls = []

    def put_then_fail(self, manifest, index, data):
        calls.append(index)
        if len(calls) > 1:
            raise StoreError("No space left on device (injected)")
        return real_put(self, manifest, index, data)

    monkeypatch.setattr(ArtifactStore, "put_manifest_chunk", put_then_fail)
    params = ChunkParams(avg_size_bytes=16 * 1024)
    with pytest.raises(StoreError, match="injected"):
        publish(model, name="face", version="1", key=PUBLISHER, store=store, params=params, created_at=WHEN)
    monkeypatch.undo()
    first = store.load_manifest("face", "1")
    assert not store.is_complete(first.manifest)
    again = publish(model, name="face", version="1", key=PUBLISHER, store=store)  # later: another created_at
    assert again == first
    assert store.verify_model(first.manifest) and store.is_origin("face", "1")
    with pytest.raises(ManifestConflictError):  # a different file still cannot take the version
        publish(wakeword_model("alexa"), name="face", version="1", key=PUBLISHER, store=store)
