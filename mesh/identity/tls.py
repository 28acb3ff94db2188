"""gRPC mutual TLS from fleet credentials, and who is on the other end of a call.

Every connection in the fleet is mutual TLS against the fleet CA:

- A server (`server_credentials`) demands a client certificate from the fleet
  CA. TLS only proves fleet membership; which member may call what is the
  servicer's decision, made with `peer_identity(context)` (for example, admin
  RPCs require `Role.OPERATOR`).
- A client (`channel_credentials`) checks the server's certificate against the
  name from `target_name`, passed as the `grpc.ssl_target_name_override`
  channel option (`secure_channel_options` builds it). Dialing node "cam-17"
  checks the server holds a fleet certificate for exactly "cam-17"; dialing a
  seed address whose id is unknown checks only that it is some fleet node.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.identity.ca import SAN_SUFFIX, Credentials, CredentialsError, Role, cert_identity, check_name

TARGET_NAME_OPTION = "grpc.ssl_target_name_override"
_PEER_CACHE_SIZE = 256


@dataclass(frozen=True)
class PeerIdentity:
    """The fleet member at the other end of a call, as its certificate names it. `serial` (hex)
    and `not_before`/`not_after` (seconds since the epoch) identify the certificate itself, for
    revocation and expiry."""

    name: str
    role: Role
    serial: str = field(default="", compare=False)
    not_before: float = field(default=0.0, compare=False)
    not_after: float = field(default=float("inf"), compare=False)


def server_credentials(creds: Credentials) -> grpc.ServerCredentials:
    """TLS for a gRPC server: present `creds`, require a client certificate from the fleet CA."""
    cert, key, ca = _read(creds)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(creds: Credentials) -> grpc.ChannelCredentials:
    """TLS for a gRPC client: present `creds`, trust only servers certified by the fleet CA.

    Use with `secure_channel_options(...)`; without the name override gRPC
    checks the server's certificate against the dialed host (an IP or
    hostname), which fleet certificates do not carry, and the handshake fails.
    """
    cert, key, ca = _read(creds)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def target_name(role: Role = Role.NODE, peer_id: str | None = None) -> str:
    """The certificate name a client expects the server it dials to hold.

    `<peer_id>.<role>.fleetmesh` when the dialer knows whom it calls, so a
    different node at that address is refused; `fleetmesh-<role>` when it does
    not (seed addresses), which any fleet member of that role satisfies.
    Pass it as the `grpc.ssl_target_name_override` channel option.
    """
    if peer_id is None:
        return f"{SAN_SUFFIX}-{role.value}"
    return f"{check_name(peer_id)}.{role.value}.{SAN_SUFFIX}"


def secure_channel_options(role: Role = Role.NODE, peer_id: str | None = None) -> list[tuple[str, str]]:
    """Channel options that make a client verify the server is `peer_id` (or any member of `role`).

    Usage::

        grpc.aio.secure_channel(
            "10.0.0.7:7400",
            channel_credentials(creds),
            options=secure_channel_options(Role.NODE, "cam-17") + other_options,
        )
    """
    return [(TARGET_NAME_OPTION, target_name(role, peer_id))]


def peer_identity(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> PeerIdentity | None:
    """Name and role of the caller, from its TLS client certificate; None without one.

    Works with sync and aio servicer contexts. None also covers a certificate
    with no fleet identity in it, so `if identity is None: refuse` is enough.
    """
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return None
    return _identity_from_pem(bytes(pems[0]))


@functools.lru_cache(maxsize=_PEER_CACHE_SIZE)
def _identity_from_pem(pem: bytes) -> PeerIdentity | None:
    # Parsing costs more than a call on an open connection; peers are few and
    # reconnect with the same certificate, so a small cache absorbs nearly all of it.
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    identity = cert_identity(cert)
    if identity is None:
        return None
    return PeerIdentity(*identity, serial=f"{cert.serial_number:x}",
                        not_before=cert.not_valid_before_utc.timestamp(),
                        not_after=cert.not_valid_after_utc.timestamp())


def _read(creds: Credentials) -> tuple[bytes, bytes, bytes]:
    """(cert, key, ca) PEM bytes, checked to belong together so gRPC never fails obscurely later."""
    blobs = []
    for path in (creds.cert_path, creds.key_path, creds.ca_path):
        try:
            blobs.append(path.read_bytes())
        except OSError as exc:
            raise CredentialsError(
                f"cannot read {path} ({exc.strerror}); issue credentials with "
                f"`mesh fleet enroll {creds.name}` or fix the credentials path in the config"
            ) from None
    cert_pem, key_pem, ca_pem = blobs
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise CredentialsError(f"{creds.directory}: cert.pem or ca.pem is not PEM ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError(f"{creds.key_path} is not an unencrypted PEM private key ({exc})") from None
    if key.public_key() != cert.public_key():
        raise CredentialsError(
            f"{creds.key_path} does not belong to {creds.cert_path}; "
            f"re-issue both with `mesh fleet enroll --force {creds.name}`"
        )
    return cert_pem, key_pem, ca_pem
