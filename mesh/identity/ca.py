"""Fleet certificate authority: create a fleet, enroll nodes and operators, load them back.

A fleet directory holds everything `mesh fleet init` makes:

    fleet.json                      fleet_id, created, publisher/operator key ids, format
    ca.pem  ca.key                  fleet CA (ECDSA P-256, 10 years); ca.key is 0600
    publisher.key  publisher.pub    Ed25519: signs manifests and rollout plans
    operator.key   operator.pub     Ed25519: signs approvals
    operators/admin/                first operator's TLS client credentials
    nodes/<name>/                   default place for enrolled nodes

Each credentials directory holds `cert.pem key.pem ca.pem` (key.pem is 0600).

A leaf certificate says who its holder is: subject CN = name, OU = role
("node" or "operator"), and two DNS SANs: `<name>.<role>.fleetmesh` (dialed
when the peer's id is known) and `fleetmesh-<role>` (dialed when it is not,
e.g. a seed address). ECDSA P-256 because gRPC's TLS stack refuses Ed25519
certificates; Ed25519 stays for application signatures (`signing`).
"""

from __future__ import annotations

import enum
import json
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.durable import write_file_atomic
from mesh.identity.signing import (
    IdentityError,
    KeyFileError,
    KeyRole,
    SigningKey,
    TrustedKeys,
    VerifyKey,
    load_verify_key,
    save_signing_key,
    save_verify_key,
)

FORMAT = 1
CA_VALIDITY_DAYS = 3650
# Node and operator certificates: short enough that a lost device's certificate dies on its own,
# long enough for devices that are offline for weeks; `mesh fleet renew` issues the next one.
LEAF_VALIDITY_DAYS = 90
# Certificates start a little in the past so a device whose clock runs slightly
# behind the CA's accepts them right away.
_BACKDATE = timedelta(minutes=5)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# The CA's CN is "fleetmesh fleet CA <fleet_id>" and X.509 caps a CN at 64 characters.
FLEET_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,44}$")
SAN_SUFFIX = "fleetmesh"

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CA_FILE = "ca.pem"
# Trust material copied into every credentials folder, so a device can verify
# manifests and approvals without the fleet directory (which holds the CA key).
PUBLISHER_PUB_FILE = "publisher.pub"
OPERATOR_PUB_FILE = "operator.pub"
# 32 random bytes (hex) from which each Raft group's password is derived; nodes only.
# Written by fleets made before Raft ran over each node's own mTLS: no longer written, copied or
# read (a node refuses to start only if one is left readable by others, since it is a secret).
LEGACY_GROUP_SECRET_FILE = "groups.secret"


class Role(enum.Enum):
    """What a TLS certificate lets its holder be. The value is the subject OU."""

    NODE = "node"
    OPERATOR = "operator"


class FleetError(IdentityError):
    """A fleet directory cannot be created, read or used as asked."""


class FleetExistsError(FleetError):
    """init_fleet was pointed at a directory that already holds a fleet."""


class FleetNotFoundError(FleetError):
    """There is no fleet in the directory given."""


class FleetFileError(FleetError):
    """A file of the fleet is missing or corrupt. `path` names it."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


class InvalidNameError(FleetError):
    """A node, operator or fleet name that cannot go into a certificate."""


class CredentialsExistError(FleetError):
    """enroll would overwrite credentials that already exist."""


class CredentialsError(IdentityError):
    """A credentials directory (cert.pem, key.pem, ca.pem) is missing or unusable."""


@dataclass(frozen=True)
class Fleet:
    """A fleet directory as loaded from disk."""

    directory: Path
    fleet_id: str
    created: datetime
    publisher_key_id: str
    operator_key_id: str

    @property
    def fleet_json_path(self) -> Path:
        return self.directory / "fleet.json"

    @property
    def ca_cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.directory / "ca.key"

    @property
    def publisher_key_path(self) -> Path:
        return self.directory / "publisher.key"

    @property
    def publisher_pub_path(self) -> Path:
        return self.directory / "publisher.pub"

    @property
    def operator_key_path(self) -> Path:
        return self.directory / "operator.key"

    @property
    def operator_pub_path(self) -> Path:
        return self.directory / "operator.pub"

    def credentials_dir(self, role: Role, name: str) -> Path:
        """Default home of a member's credentials: nodes/<name> or operators/<name>."""
        return self.directory / _ROLE_DIRS[role] / name

    def trusted_keys(self) -> TrustedKeys:
        """The fleet's publisher and operator public keys, each trusted for its own role."""
        return TrustedKeys(
            [
                load_verify_key(self.publisher_pub_path, KeyRole.PUBLISHER),
                load_verify_key(self.operator_pub_path, KeyRole.OPERATOR),
            ]
        )


@dataclass(frozen=True)
class Credentials:
    """Where one member's TLS credentials live, and who they say it is."""

    name: str
    role: Role
    cert_path: Path
    key_path: Path
    ca_path: Path

    @property
    def directory(self) -> Path:
        return self.cert_path.parent


_ROLE_DIRS = {Role.NODE: "nodes", Role.OPERATOR: "operators"}
_FLEET_FILES = (
    "fleet.json",
    "ca.pem",
    "ca.key",
    "publisher.key",
    "publisher.pub",
    "operator.key",
    "operator.pub",
)


def check_name(name: str) -> str:
    """Return `name` if it can be a node or operator name, else raise InvalidNameError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid name {name!r}: use 1-63 characters from letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (e.g. cam-17 or gw01.site-a)"
        )
    return name


def init_fleet(fleet_dir: Path, *, fleet_id: str | None = None, force: bool = False) -> Fleet:
    """Create a new fleet in `fleet_dir`: CA, publisher and operator keys, admin operator.

    Refuses a directory that already holds a fleet unless `force`; with `force`
    the old fleet's keys are replaced and its nodes/ and operators/ directories
    are deleted, since nothing they hold would be trusted by the new CA.
    """
    fleet_dir = Path(fleet_dir)
    if fleet_id is None:
        fleet_id = secrets.token_hex(8)
    elif not FLEET_ID_RE.fullmatch(fleet_id):
        raise InvalidNameError(
            f"invalid fleet id {fleet_id!r}: use 1-45 characters from letters, digits, "
            "'.', '_' and '-', starting with a letter or digit"
        )
    existing = [n for n in ("fleet.json", "ca.pem", "ca.key") if (fleet_dir / n).exists()]
    if existing and not force:
        raise FleetExistsError(
            f"{fleet_dir} already holds a fleet ({', '.join(existing)}); "
            "use it as is, choose another directory, or re-run with --force to replace it "
            "(this invalidates every certificate and key it issued)"
        )

    # Make every key before writing anything, so a failure leaves the directory as it was.
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC).replace(microsecond=0)
    ca_cert = _ca_certificate(ca_key, fleet_id, now)
    publisher = SigningKey.generate(KeyRole.PUBLISHER)
    operator = SigningKey.generate(KeyRole.OPERATOR)
    fleet = Fleet(
        directory=fleet_dir,
        fleet_id=fleet_id,
        created=now,
        publisher_key_id=publisher.key_id,
        operator_key_id=operator.key_id,
    )

    fleet_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if existing:
        fleet.fleet_json_path.unlink(missing_ok=True)  # marks the directory as "no fleet" first
        for sub in _ROLE_DIRS.values():
            shutil.rmtree(fleet_dir / sub, ignore_errors=True)
    write_file_atomic(fleet.ca_key_path, _private_pem(ca_key), 0o600)
    write_file_atomic(fleet.ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    save_signing_key(publisher, fleet.publisher_key_path)
    save_verify_key(publisher.verify_key, fleet.publisher_pub_path)
    save_signing_key(operator, fleet.operator_key_path)
    save_verify_key(operator.verify_key, fleet.operator_pub_path)
    # fleet.json goes last: its presence means the fleet is complete.
    document = {
        "fleet_id": fleet_id,
        "created": now.isoformat(),
        "publisher_key_id": publisher.key_id,
        "operator_key_id": operator.key_id,
        "format": FORMAT,
    }
    write_file_atomic(fleet.fleet_json_path, (json.dumps(document, indent=2) + "\n").encode(), 0o644)
    enroll(fleet_dir, "admin", role=Role.OPERATOR)
    return fleet


def enroll(
    fleet_dir: Path,
    name: str,
    *,
    role: Role = Role.NODE,
    out_dir: Path | None = None,
    validity_days: int = LEAF_VALIDITY_DAYS,
    force: bool = False,
) -> Credentials:
    """Issue TLS credentials for node or operator `name`, signed by the fleet CA.

    Writes cert.pem, key.pem (0600) and ca.pem into `out_dir` (default
    nodes/<name> or operators/<name> under the fleet). Refuses to overwrite
    existing credentials unless `force` (re-issuing, e.g. before expiry).
    """
    check_name(name)
    if validity_days < 1:
        raise FleetError(f"validity_days must be at least 1, got {validity_days}")
    fleet = load_fleet(fleet_dir)
    ca_cert = _load_cert(fleet.ca_cert_path)
    ca_key = _load_ca_key(fleet.ca_key_path, ca_cert)
    out_dir = Path(out_dir) if out_dir is not None else fleet.credentials_dir(role, name)
    creds = Credentials(
        name=name,
        role=role,
        cert_path=out_dir / CERT_FILE,
        key_path=out_dir / KEY_FILE,
        ca_path=out_dir / CA_FILE,
    )
    if out_dir.parent == fleet.directory / _ROLE_DIRS[role]:
        _refuse_case_twin(out_dir.parent, name, role)
    if creds.cert_path.exists() and not force:
        raise CredentialsExistError(
            f"{creds.cert_path} already exists; re-run with --force to re-issue "
            f"credentials for {role.value} {name!r}"
        )

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC).replace(microsecond=0)
    cert = _leaf_certificate(key, name, role, fleet.fleet_id, ca_cert, ca_key, now, validity_days)

    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file_atomic(creds.key_path, _private_pem(key), 0o600)
    write_file_atomic(creds.cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    write_file_atomic(creds.ca_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    write_file_atomic(out_dir / PUBLISHER_PUB_FILE, fleet.publisher_pub_path.read_bytes(), 0o644)
    write_file_atomic(out_dir / OPERATOR_PUB_FILE, fleet.operator_pub_path.read_bytes(), 0o644)
    return creds


def load_trusted_keys(directory: Path) -> TrustedKeys:
    """The fleet's publisher and operator public keys from a credentials folder."""
    directory = Path(directory)
    paths = ((directory / PUBLISHER_PUB_FILE, KeyRole.PUBLISHER),
             (directory / OPERATOR_PUB_FILE, KeyRole.OPERATOR))
    for path, _ in paths:
        if not path.exists():
            raise CredentialsError(
                f"{path} is missing; re-issue this member's credentials with `mesh fleet enroll --force` "
                "(it copies the fleet's publisher.pub and operator.pub) "
                "or copy the file from the fleet folder"
            )
    try:
        return TrustedKeys([load_verify_key(path, role) for path, role in paths])
    except KeyFileError as exc:
        raise CredentialsError(str(exc)) from None


def load_publisher_key(directory: Path) -> VerifyKey:
    """The fleet's publisher public key from a fleet folder or any member's credentials folder
    (both hold publisher.pub): what every node checks manifests and rollout plans against."""
    path = Path(directory) / PUBLISHER_PUB_FILE
    if not path.exists():
        raise CredentialsError(
            f"{path} is missing; the fleet folder and every credentials folder from "
            "`mesh fleet enroll` hold it"
        )
    try:
        return load_verify_key(path, KeyRole.PUBLISHER)
    except KeyFileError as exc:
        raise CredentialsError(str(exc)) from None


def load_fleet(fleet_dir: Path) -> Fleet:
    """Read a fleet directory, checking that its files exist and agree with fleet.json."""
    fleet_dir = Path(fleet_dir)
    meta_path = fleet_dir / "fleet.json"
    if not meta_path.exists():
        raise FleetNotFoundError(
            f"no fleet in {fleet_dir} ({meta_path.name} is missing); "
            f"create one with `mesh fleet init {fleet_dir}` or point at the right directory"
        )
    meta = _read_fleet_json(meta_path)
    try:
        fleet = Fleet(
            directory=fleet_dir,
            fleet_id=str(meta["fleet_id"]),
            created=datetime.fromisoformat(meta["created"]),
            publisher_key_id=str(meta["publisher_key_id"]),
            operator_key_id=str(meta["operator_key_id"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise FleetFileError(
            meta_path, f"{meta_path} is corrupt ({type(exc).__name__}: {exc}); restore it from a backup"
        ) from None

    for file_name in _FLEET_FILES:
        if not (fleet_dir / file_name).exists():
            raise FleetFileError(
                fleet_dir / file_name,
                f"{fleet_dir / file_name} is missing; restore it from a backup of the fleet directory",
            )
    _load_cert(fleet.ca_cert_path)
    for role, path, expected in (
        (KeyRole.PUBLISHER, fleet.publisher_pub_path, fleet.publisher_key_id),
        (KeyRole.OPERATOR, fleet.operator_pub_path, fleet.operator_key_id),
    ):
        try:
            found = load_verify_key(path, role).key_id
        except KeyFileError as exc:
            raise FleetFileError(path, f"{exc}; the file is corrupt, restore it from a backup") from None
        if found != expected:
            raise FleetFileError(
                path,
                f"{path} holds key {found} but {meta_path.name} names {role.value} key {expected}; "
                "restore the matching file from a backup",
            )
    return fleet


def load_credentials(directory: Path) -> Credentials:
    """Read the credentials in `directory` (cert.pem, key.pem, ca.pem); name and role come from the cert."""
    directory = Path(directory)
    for file_name in (CERT_FILE, KEY_FILE, CA_FILE):
        if not (directory / file_name).exists():
            raise CredentialsError(
                f"{directory / file_name} is missing; issue credentials with "
                "`mesh fleet enroll <name>` and copy cert.pem, key.pem and ca.pem into "
                f"{directory}"
            )
    try:
        cert = x509.load_pem_x509_certificate((directory / CERT_FILE).read_bytes())
    except ValueError as exc:
        raise CredentialsError(f"{directory / CERT_FILE} is not a PEM certificate: {exc}") from None
    identity = cert_identity(cert)
    if identity is None:
        raise CredentialsError(
            f"{directory / CERT_FILE} is not a fleetmesh certificate (no CN and node/operator OU); "
            "issue one with `mesh fleet enroll`"
        )
    name, role = identity
    return Credentials(
        name=name,
        role=role,
        cert_path=directory / CERT_FILE,
        key_path=directory / KEY_FILE,
        ca_path=directory / CA_FILE,
    )


def cert_identity(cert: x509.Certificate) -> tuple[str, Role] | None:
    """(name, role) from a fleet certificate's CN and OU, or None if it has no such identity."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cns) != 1 or len(ous) != 1:
        return None
    try:
        role = Role(ous[0].value)
    except ValueError:
        return None
    return str(cns[0].value), role


def san_names(name: str, role: Role) -> list[str]:
    """The DNS names a certificate for `name` in `role` is valid for."""
    return [f"{name}.{role.value}.{SAN_SUFFIX}", f"{SAN_SUFFIX}-{role.value}"]


def _ca_certificate(key: ec.EllipticCurvePrivateKey, fleet_id: str, now: datetime) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetmesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"fleetmesh fleet CA {fleet_id}"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_certificate(
    key: ec.EllipticCurvePrivateKey,
    name: str,
    role: Role,
    fleet_id: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime,
    validity_days: int,
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"fleetmesh fleet {fleet_id}"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    # Nodes both serve and dial; operators only dial, so they get no server auth.
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role is Role.NODE:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    # A leaf never outlives its CA: peers would reject it after the CA expires anyway.
    not_after = min(now + timedelta(days=validity_days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in san_names(name, role)]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _refuse_case_twin(members_dir: Path, name: str, role: Role) -> None:
    # TLS compares names case-insensitively: a certificate for "CAM-1" would pass
    # for a client dialing "cam-1", so two such members must never coexist.
    if not members_dir.is_dir():
        return
    for other in members_dir.iterdir():
        if other.name != name and other.name.lower() == name.lower():
            raise InvalidNameError(
                f"{role.value} {other.name!r} already exists and TLS names ignore case, so "
                f"{name!r} would be indistinguishable from it; choose another name"
            )


def _read_fleet_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_bytes())
    except OSError as exc:
        raise FleetFileError(path, f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise FleetFileError(path, f"{path} is not valid JSON ({exc}); restore it from a backup") from None
    if not isinstance(meta, dict):
        raise FleetFileError(path, f"{path} is not a JSON object; restore it from a backup")
    if meta.get("format") != FORMAT:
        raise FleetFileError(
            path,
            f"{path} has format {meta.get('format')!r}; this fleetmesh reads format {FORMAT} "
            "(upgrade fleetmesh if the fleet was made by a newer version)",
        )
    return meta


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise FleetFileError(path, f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise FleetFileError(
            path, f"{path} is not a PEM certificate ({exc}); restore it from a backup"
        ) from None


def _load_ca_key(path: Path, ca_cert: x509.Certificate) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise FleetFileError(path, f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise FleetFileError(path, f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != ca_cert.public_key():
        raise FleetFileError(
            path, f"{path} does not belong to the CA certificate in ca.pem; restore both from one backup"
        )
    return key


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


