"""Manifest codec and publisher-signature verification, on manifests of real models."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.artifacts.chunking import ChunkParams, plan_chunks
from mesh.artifacts.manifest import (
    FORMAT,
    MAX_MANIFEST_BYTES,
    ChunkRef,
    Manifest,
    ManifestFormatError,
    ManifestSignatureError,
    SignedManifest,
    check_name,
    sign_manifest,
    verify_manifest,
)
from mesh.identity.signing import KeyRole, SigningKey, TrustedKeys, canonical_json
from mesh.inference.backend import inspect_model
from tests.models import wakeword_model

PUBLISHER = SigningKey.generate(KeyRole.PUBLISHER)
OPERATOR = SigningKey.generate(KeyRole.OPERATOR)
NODE = SigningKey.generate(KeyRole.NODE)
STRANGER = SigningKey.generate(KeyRole.PUBLISHER)  # a publisher key of some other fleet
FLEET = TrustedKeys([PUBLISHER.verify_key, OPERATOR.verify_key, NODE.verify_key])


SMALL = ChunkParams(avg_size_bytes=8192)


def make_manifest(data: bytes, signature, *, name="okay-nabu", version="1.4", key=PUBLISHER,
                  params=SMALL) -> Manifest:
    return Manifest(name=name, version=version, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                    chunks=tuple(plan_chunks(data, params)), signature=signature,
                    min_runtime_version="2.3.0", publisher_key_id=key.key_id,
                    created_at="2026-11-29T04:00:00Z")


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    path = wakeword_model("okay_nabu")
    return make_manifest(path.read_bytes(), inspect_model(path))


@pytest.fixture(scope="module")
def signed(manifest) -> SignedManifest:
    return sign_manifest(manifest, PUBLISHER)


def redo(signed: SignedManifest, edit) -> bytes:
    """The signed document with `edit(doc)` applied to its parsed JSON, re-encoded."""
    doc = json.loads(signed.to_json())
    edit(doc)
    return canonical_json(doc)


# --- round trip and verification ------------------------------------------------------------

def test_real_model_manifest_round_trips_and_verifies(manifest, signed):
    assert len(manifest.chunks) > 3  # 80 KB cut at ~8 KiB
    again = SignedManifest.from_json(signed.to_json())
    assert again == signed
    assert again.digest == manifest.digest == hashlib.sha256(manifest.canonical_bytes()).hexdigest()
    assert verify_manifest(again, FLEET) == manifest
    assert manifest.signature.inputs[0].dtype == "int8"


def test_document_shape(signed):
    doc = json.loads(signed.to_json())
    assert set(doc) == {"manifest", "publisher_signature"}
    assert doc["manifest"]["format"] == FORMAT
    assert set(doc["manifest"]["chunks"][0]) == {"index", "offset", "size_bytes", "sha256"}
    assert len(doc["publisher_signature"]) == 128


@pytest.mark.parametrize("edit", [
    lambda d: d["manifest"].update(version="1.5"),
    lambda d: d["manifest"].update(min_runtime_version="1.0"),
    lambda d: d["manifest"]["chunks"][1].update(sha256="0" * 64),
    lambda d: d["manifest"].update(sha256="f" * 64),
    lambda d: d["manifest"]["signature"]["inputs"][0].update(shape=[1, 3, 41]),
], ids=["version", "runtime", "chunk-hash", "file-hash", "io-shape"])
def test_tampered_field_is_refused(signed, edit):
    tampered = SignedManifest.from_json(redo(signed, edit))
    with pytest.raises(ManifestSignatureError, match="changed after signing"):
        verify_manifest(tampered, FLEET)


def test_tampered_signature_is_refused(signed):
    sig = bytearray(signed.publisher_signature)
    sig[10] ^= 1
    with pytest.raises(ManifestSignatureError, match=PUBLISHER.key_id):
        verify_manifest(SignedManifest(signed.manifest, bytes(sig)), FLEET)


@pytest.mark.parametrize("key,why", [(NODE, "it is a node key"), (OPERATOR, "it is an operator key"),
                                     (STRANGER, "does not trust that key")],
                         ids=["node", "operator", "unknown"])
def test_manifest_signed_by_a_non_publisher_key_is_refused(manifest, key, why):
    forged = dataclasses.replace(manifest, publisher_key_id=key.key_id)
    # Signed by hand: sign_manifest itself refuses non-publisher keys (tested below).
    signed = SignedManifest(forged, key.sign(forged.canonical_bytes()))
    with pytest.raises(ManifestSignatureError) as info:
        verify_manifest(signed, FLEET)
    message = str(info.value)
    assert f"manifest for okay-nabu 1.4 is signed by key {key.key_id}, which is not a fleet publisher key" \
        in message
    assert why in message


def test_claiming_the_publisher_key_id_with_another_key_is_refused(manifest):
    signed = SignedManifest(manifest, NODE.sign(manifest.canonical_bytes()))
    with pytest.raises(ManifestSignatureError, match="changed after signing"):
        verify_manifest(signed, FLEET)


def test_sign_manifest_needs_the_named_publisher_key(manifest):
    with pytest.raises(ManifestSignatureError, match="node key"):
        sign_manifest(dataclasses.replace(manifest, publisher_key_id=NODE.key_id), NODE)
    with pytest.raises(ManifestSignatureError, match="names publisher key"):
        sign_manifest(manifest, STRANGER)


# --- strict parsing -------------------------------------------------------------------------

def test_newer_format_says_upgrade(signed):
    with pytest.raises(ManifestFormatError, match="format 2 is newer .* upgrade the node"):
        SignedManifest.from_json(redo(signed, lambda d: d["manifest"].update(format=2, shiny=True)))
    with pytest.raises(ManifestFormatError, match="format 'one' is not known"):
        SignedManifest.from_json(redo(signed, lambda d: d["manifest"].update(format="one")))


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["manifest"].update(extra=1), "unknown fields \\['extra'\\]"),
    (lambda d: d.update(extra=1), "unknown fields"),
    (lambda d: d["manifest"]["chunks"][0].update(extra=1), "chunk entry has unknown fields"),
    (lambda d: d["manifest"].pop("sha256"), "missing fields \\['sha256'\\]"),
    (lambda d: d["manifest"].update(size_bytes=d["manifest"]["size_bytes"] + 1), "add up to"),
    (lambda d: d["manifest"]["chunks"][1].update(offset=d["manifest"]["chunks"][1]["offset"] + 1),
     "contiguous"),
    (lambda d: d["manifest"]["chunks"].reverse(), "has index"),
    (lambda d: d["manifest"].update(chunks=[]), "no chunks"),
    (lambda d: d["manifest"].update(name="../etc"), "model name '../etc' is not allowed"),
    (lambda d: d["manifest"].update(version="1/2"), "is not allowed"),
    (lambda d: d["manifest"].update(size_bytes=True), "size_bytes must be an integer"),
    (lambda d: d["manifest"].update(created_at="yesterday"), "created_at"),
    (lambda d: d["manifest"].update(publisher_key_id="XYZ"), "publisher_key_id"),
    (lambda d: d["manifest"].update(min_runtime_version="latest"), "min_runtime_version"),
    (lambda d: d["manifest"]["signature"]["inputs"][0].update(dtype="complex64"), "unsupported dtype"),
    (lambda d: d["manifest"]["signature"]["inputs"][0].update(zero_point=-128.0), "canonical form"),
    (lambda d: d.update(publisher_signature="00"), "publisher_signature"),
], ids=["manifest-extra", "top-extra", "chunk-extra", "missing", "size", "gap", "order", "empty",
        "name-path", "version-path", "bool-int", "time", "key-id", "runtime", "dtype", "float-for-int",
        "short-signature"])
def test_malformed_documents_are_refused_with_a_reason(signed, edit, match):
    with pytest.raises(ManifestFormatError, match=match):
        SignedManifest.from_json(redo(signed, edit))


@pytest.mark.parametrize("data", [
    b"", b"null", b"[]", b"\xff\xfe", b"{", b'{"manifest": NaN}', b'{"manifest": 1e999}',
    b"[" * 100_000, b"1" * 5000, b" " * (MAX_MANIFEST_BYTES + 1),
], ids=["empty", "null", "list", "not-utf8", "truncated", "nan", "inf", "deep", "huge-int", "too-big"])
def test_garbage_is_a_format_error(data):
    with pytest.raises(ManifestFormatError):
        SignedManifest.from_json(data)


@pytest.mark.parametrize("name", ["face-detect", "1.4", "v2.0.0-rc1", "hand_landmark_full", "A" * 64])
def test_safe_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "-flag", "a/b", "a\\b", "a b", "é", "A" * 65, 7])
def test_unsafe_names(name):
    with pytest.raises(ManifestFormatError, match="not allowed"):
        check_name(name)


def test_chunk_ref_limits():
    with pytest.raises(ManifestFormatError, match="at most"):
        ChunkRef(0, 0, 17 * 1024 * 1024, "0" * 64)
    with pytest.raises(ManifestFormatError, match=">= 1"):
        ChunkRef(0, 0, 0, "0" * 64)
    with pytest.raises(ManifestFormatError, match="SHA-256"):
        ChunkRef(0, 0, 1, "0" * 63)


# --- fuzzing: any input gives a typed error or a manifest, never another exception ----------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _parse_or_refuse(data: bytes) -> None:
    try:
        parsed = SignedManifest.from_json(data)
    except ManifestFormatError:
        return
    with contextlib.suppress(ManifestSignatureError):
        verify_manifest(parsed, FLEET)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_garbage_bytes(data):
    _parse_or_refuse(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_documents(signed, data):
    doc = json.loads(signed.to_json())
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = list(_paths(doc))[1:]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
        if action == "replace":
            parent[path[-1]] = data.draw(json_values, label="value")
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=10), label="key")] = data.draw(json_values, label="value")
        else:
            parent.append(data.draw(json_values, label="value"))
    _parse_or_refuse(json.dumps(doc).encode())


def test_unmutated_document_survives_the_fuzz_harness(signed):
    doc = copy.deepcopy(json.loads(signed.to_json()))
    assert SignedManifest.from_json(json.dumps(doc).encode()) == signed  # non-canonical spacing is fine
