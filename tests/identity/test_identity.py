"""Fleet CA files and certificates, and role-bound signatures."""

from __future__ import annotations

import json
import random
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from mesh.identity import (
    CredentialsExistError,
    FleetExistsError,
    FleetFileError,
    FleetNotFoundError,
    InvalidNameError,
    KeyRole,
    KeyRoleError,
    Role,
    SignatureError,
    SigningKey,
    TrustedKeys,
    UnknownKeyError,
    VerifyKey,
    canonical_json,
    enroll,
    init_fleet,
    load_credentials,
    load_fleet,
    load_trusted_keys,
)
from mesh.identity.signing import load_signing_key, load_verify_key, save_signing_key


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _assert_issued_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fleet") / "fleet"
    init_fleet(directory, fleet_id="test-fleet")
    return directory


# --- init_fleet / load_fleet ----------------------------------------------------


def test_init_fleet_writes_the_documented_layout(fleet_dir: Path) -> None:
    for name in (
        "fleet.json",
        "ca.pem",
        "ca.key",
        "publisher.key",
        "publisher.pub",
        "operator.key",
        "operator.pub",
    ):
        assert (fleet_dir / name).is_file(), name
    for name in ("cert.pem", "key.pem", "ca.pem"):
        assert (fleet_dir / "operators" / "admin" / name).is_file(), name

    meta = json.loads((fleet_dir / "fleet.json").read_text())
    assert meta["fleet_id"] == "test-fleet"
    assert meta["format"] == 1
    fleet = load_fleet(fleet_dir)
    assert meta["publisher_key_id"] == fleet.publisher_key_id
    assert meta["operator_key_id"] == fleet.operator_key_id
    assert fleet.publisher_key_id != fleet.operator_key_id


def test_private_keys_are_owner_only(fleet_dir: Path) -> None:
    for path in (
        fleet_dir / "ca.key",
        fleet_dir / "publisher.key",
        fleet_dir / "operator.key",
        fleet_dir / "operators" / "admin" / "key.pem",
    ):
        assert _mode(path) == 0o600, path
    assert _mode(fleet_dir / "ca.pem") == 0o644


def test_ca_is_a_p256_ca_named_for_the_fleet(fleet_dir: Path) -> None:
    ca = _cert(fleet_dir / "ca.pem")
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fleetmesh fleet CA test-fleet"
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert 3650 <= lifetime.days <= 3651
    _assert_issued_by(ca, ca)


def test_admin_operator_certificate(fleet_dir: Path) -> None:
    creds = load_credentials(fleet_dir / "operators" / "admin")
    assert (creds.name, creds.role) == ("admin", Role.OPERATOR)
    cert = _cert(creds.cert_path)
    _assert_issued_by(cert, _cert(fleet_dir / "ca.pem"))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["admin.operator.fleetmesh", "fleetmesh-operator"]
    ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(ekus) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_reinit_is_refused_without_force(fleet_dir: Path) -> None:
    with pytest.raises(FleetExistsError, match="--force"):
        init_fleet(fleet_dir)


def test_reinit_with_force_replaces_the_fleet(tmp_path: Path) -> None:
    old = init_fleet(tmp_path)
    enroll(tmp_path, "cam-1")
    new = init_fleet(tmp_path, force=True)
    assert new.fleet_id != old.fleet_id
    assert new.publisher_key_id != old.publisher_key_id
    assert not (tmp_path / "nodes" / "cam-1").exists()  # issued by the old CA: useless now
    assert load_fleet(tmp_path) == new
    _assert_issued_by(_cert(tmp_path / "operators" / "admin" / "cert.pem"), _cert(tmp_path / "ca.pem"))


def test_bad_fleet_id_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidNameError):
        init_fleet(tmp_path, fleet_id="a" * 46)
    assert not (tmp_path / "fleet.json").exists()


def test_load_fleet_without_fleet_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FleetNotFoundError, match="mesh fleet init"):
        load_fleet(tmp_path)


@pytest.mark.parametrize(
    ("file_name", "damage"),
    [
        ("fleet.json", b"{not json"),
        ("fleet.json", b'{"format": 1}'),
        ("fleet.json", b'{"format": 99, "fleet_id": "x"}'),
        ("ca.pem", b"garbage"),
        ("publisher.pub", b"garbage"),
        ("operator.pub", None),
        ("ca.key", None),
    ],
)
def test_load_fleet_names_the_broken_file(tmp_path: Path, file_name: str, damage: bytes | None) -> None:
    init_fleet(tmp_path)
    if damage is None:
        (tmp_path / file_name).unlink()
    else:
        (tmp_path / file_name).write_bytes(damage)
    with pytest.raises(FleetFileError) as info:
        load_fleet(tmp_path)
    assert info.value.path == tmp_path / file_name
    assert file_name in str(info.value)


def test_swapped_public_key_is_detected(tmp_path: Path) -> None:
    init_fleet(tmp_path)
    (tmp_path / "publisher.pub").write_bytes((tmp_path / "operator.pub").read_bytes())
    with pytest.raises(FleetFileError, match="publisher.pub holds key"):
        load_fleet(tmp_path)


# --- enroll -----------------------------------------------------------------------


def test_enroll_node(fleet_dir: Path) -> None:
    creds = enroll(fleet_dir, "cam-17", validity_days=30)
    assert creds.cert_path == fleet_dir / "nodes" / "cam-17" / "cert.pem"
    assert (creds.name, creds.role) == ("cam-17", Role.NODE)
    assert _mode(creds.key_path) == 0o600
    assert creds.ca_path.read_bytes() == (fleet_dir / "ca.pem").read_bytes()
    assert load_credentials(creds.directory) == creds

    cert = _cert(creds.cert_path)
    _assert_issued_by(cert, _cert(fleet_dir / "ca.pem"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-17"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "node"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["cam-17.node.fleetmesh", "fleetmesh-node"]
    ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(ekus) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30  # plus the backdating
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_node_credentials_carry_the_fleet_trust_and_no_shared_secret(fleet_dir: Path, tmp_path: Path) -> None:
    fleet = load_fleet(fleet_dir)
    node = enroll(fleet_dir, "cam-18", out_dir=tmp_path / "device")
    trusted = load_trusted_keys(node.directory)
    publisher = load_signing_key(fleet_dir / "publisher.key", KeyRole.PUBLISHER)
    manifest = b"face-detect 1.4"
    assert trusted.verify(KeyRole.PUBLISHER, manifest, publisher.sign(manifest), fleet.publisher_key_id)
    with pytest.raises(KeyRoleError):  # the operator key is trusted, but not to sign manifests
        operator = load_signing_key(fleet_dir / "operator.key", KeyRole.OPERATOR)
        trusted.verify(KeyRole.PUBLISHER, manifest, operator.sign(manifest), fleet.operator_key_id)
    # A device holds nothing valid beyond itself: no fleet-wide secret is made or copied.
    assert sorted(p.name for p in node.directory.iterdir()) == [
        "ca.pem", "cert.pem", "key.pem", "operator.pub", "publisher.pub"]
    assert not (fleet_dir / "groups.secret").exists()

    operator_creds = load_credentials(fleet_dir / "operators" / "admin")
    assert len(load_trusted_keys(operator_creds.directory)) == 2


def test_enroll_operator_into_chosen_dir(fleet_dir: Path, tmp_path: Path) -> None:
    creds = enroll(fleet_dir, "alice", role=Role.OPERATOR, out_dir=tmp_path / "alice")
    assert creds.directory == tmp_path / "alice"
    assert load_credentials(tmp_path / "alice").role == Role.OPERATOR


def test_enroll_refuses_to_overwrite_without_force(fleet_dir: Path) -> None:
    first = enroll(fleet_dir, "gw-1")
    old = first.cert_path.read_bytes()
    with pytest.raises(CredentialsExistError, match="--force"):
        enroll(fleet_dir, "gw-1")
    enroll(fleet_dir, "gw-1", force=True)
    assert first.cert_path.read_bytes() != old


def test_enroll_refuses_names_differing_only_in_case(fleet_dir: Path) -> None:
    enroll(fleet_dir, "door-cam")
    with pytest.raises(InvalidNameError, match="ignore case"):
        enroll(fleet_dir, "Door-Cam")


@pytest.mark.parametrize(
    "name",
    ["", "-cam", ".cam", "cam 1", "cam/1", "../etc", "cäm", "a" * 64, "cam*", "cam\n"],
)
def test_bad_names_refused(fleet_dir: Path, name: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid name"):
        enroll(fleet_dir, name)


@pytest.mark.parametrize("name", ["a", "A1", "gw01.site-a", "cam_7", "a" * 63])
def test_good_names_accepted(fleet_dir: Path, tmp_path: Path, name: str) -> None:
    assert enroll(fleet_dir, name, out_dir=tmp_path / "creds").name == name


def test_enroll_without_fleet(tmp_path: Path) -> None:
    with pytest.raises(FleetNotFoundError):
        enroll(tmp_path, "cam-1")


def test_fleet_trusted_keys_match_the_private_keys(fleet_dir: Path) -> None:
    fleet = load_fleet(fleet_dir)
    trusted = fleet.trusted_keys()
    publisher = load_signing_key(fleet.publisher_key_path, KeyRole.PUBLISHER)
    operator = load_signing_key(fleet.operator_key_path, KeyRole.OPERATOR)
    assert publisher.key_id == fleet.publisher_key_id
    trusted.verify(KeyRole.PUBLISHER, b"m", publisher.sign(b"m"), publisher.key_id)
    trusted.verify(KeyRole.OPERATOR, b"a", operator.sign(b"a"), operator.key_id)
    with pytest.raises(KeyRoleError):
        trusted.verify(KeyRole.PUBLISHER, b"m", operator.sign(b"m"), operator.key_id)


# --- signing ------------------------------------------------------------------------


def test_sign_verify_roundtrip() -> None:
    key = SigningKey.generate(KeyRole.PUBLISHER)
    signature = key.sign(b"manifest")
    assert len(signature) == 64
    key.verify_key.verify(b"manifest", signature)


def test_key_id_is_sha256_prefix_of_raw_public_key() -> None:
    import hashlib

    key = SigningKey.generate(KeyRole.NODE)
    assert key.key_id == hashlib.sha256(key.verify_key.raw).hexdigest()[:16]
    assert "PRIVATE" not in repr(key)


def test_tampered_data_refused_naming_the_key() -> None:
    key = SigningKey.generate(KeyRole.PUBLISHER)
    signature = key.sign(b"version 1.4")
    with pytest.raises(SignatureError, match=key.key_id):
        key.verify_key.verify(b"version 1.5", signature)
    with pytest.raises(SignatureError):
        key.verify_key.verify(b"version 1.4", signature[:-1] + bytes([signature[-1] ^ 1]))


def test_wrong_key_refused() -> None:
    signer, other = SigningKey.generate(KeyRole.PUBLISHER), SigningKey.generate(KeyRole.PUBLISHER)
    with pytest.raises(SignatureError):
        other.verify_key.verify(b"data", signer.sign(b"data"))


def test_trusted_keys_refuse_a_node_key_where_publisher_is_required() -> None:
    publisher = SigningKey.generate(KeyRole.PUBLISHER)
    node = SigningKey.generate(KeyRole.NODE)
    trusted = TrustedKeys([publisher.verify_key, node.verify_key])

    assert (
        trusted.verify(KeyRole.PUBLISHER, b"plan", publisher.sign(b"plan"), publisher.key_id)
        == publisher.verify_key
    )
    with pytest.raises(KeyRoleError, match=f"{node.key_id}, which is a node key; only publisher keys"):
        trusted.verify(KeyRole.PUBLISHER, b"plan", node.sign(b"plan"), node.key_id)
    # Claiming the publisher's key id does not help a node signature either.
    with pytest.raises(SignatureError):
        trusted.verify(KeyRole.PUBLISHER, b"plan", node.sign(b"plan"), publisher.key_id)


def test_trusted_keys_refuse_unknown_key() -> None:
    stranger = SigningKey.generate(KeyRole.OPERATOR)
    with pytest.raises(UnknownKeyError, match=stranger.key_id):
        TrustedKeys().verify(KeyRole.OPERATOR, b"x", stranger.sign(b"x"), stranger.key_id)


def test_one_key_cannot_hold_two_roles() -> None:
    node = SigningKey.generate(KeyRole.NODE)
    same_bytes_as_publisher = VerifyKey(node.verify_key.raw, KeyRole.PUBLISHER)
    trusted = TrustedKeys([node.verify_key])
    with pytest.raises(KeyRoleError, match="already trusted as a node key"):
        trusted.add(same_bytes_as_publisher)
    assert trusted.keys(KeyRole.PUBLISHER) == frozenset()
    trusted.add(node.verify_key)  # the same key in the same role again is fine
    assert len(trusted) == 1


def test_pem_roundtrip(tmp_path: Path) -> None:
    key = SigningKey.generate(KeyRole.OPERATOR)
    save_signing_key(key, tmp_path / "op.key")
    assert _mode(tmp_path / "op.key") == 0o600
    loaded = load_signing_key(tmp_path / "op.key", KeyRole.OPERATOR)
    assert loaded.key_id == key.key_id
    assert VerifyKey.from_pem(key.verify_key.to_pem(), KeyRole.OPERATOR) == key.verify_key
    loaded.verify_key.verify(b"x", key.sign(b"x"))


def test_loading_a_tls_key_as_signing_key_is_refused(fleet_dir: Path) -> None:
    from mesh.identity import KeyFileError

    with pytest.raises(KeyFileError, match="Ed25519") as refused:
        load_signing_key(fleet_dir / "ca.key", KeyRole.PUBLISHER)
    assert str(refused.value).startswith(f"{fleet_dir / 'ca.key'} is not a publisher signing key")
    with pytest.raises(KeyFileError, match="cannot read"):
        load_verify_key(fleet_dir / "missing.pub", KeyRole.PUBLISHER)


# --- canonical_json -----------------------------------------------------------------

_json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
)
_json = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=30,
)


@given(st.dictionaries(st.text(), _json, max_size=8))
def test_canonical_json_roundtrips(doc: dict) -> None:
    assert json.loads(canonical_json(doc)) == doc


@given(st.dictionaries(st.text(), _json, max_size=8), st.randoms(use_true_random=False))
def test_canonical_json_ignores_key_order(doc: dict, rng: random.Random) -> None:
    items = list(doc.items())
    rng.shuffle(items)
    assert canonical_json(dict(items)) == canonical_json(doc)


@given(_json)
def test_canonical_json_is_stable_through_decoding(doc: object) -> None:
    encoded = canonical_json(doc)
    assert canonical_json(json.loads(encoded)) == encoded


def test_canonical_json_exact_bytes() -> None:
    assert canonical_json({"b": [1, 2.5, None], "a": {"z": True, "é": "ü"}}) == (
        '{"a":{"z":true,"é":"ü"},"b":[1,2.5,null]}'.encode()
    )


@pytest.mark.parametrize("bad", [{1: "a"}, {"a": [{2: "b"}]}, {"x": float("nan")}, {"x": float("inf")}])
def test_canonical_json_refuses_ambiguous_documents(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        canonical_json(bad)
