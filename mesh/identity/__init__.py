"""Fleet identity: the fleet CA and mTLS credentials, and role-bound Ed25519 signatures.

- `ca`: `init_fleet`, `enroll`, `load_fleet`, `load_credentials` (files on disk).
- `signing`: pure sign/verify with key roles (publisher, operator, node) and
  `canonical_json` for signing structured documents.
- `tls`: gRPC credentials from fleet credentials and `peer_identity` of a caller.
- `authz`: the role checks servicers make on callers (`require_operator`).

`tls` and `authz` import grpc, so they are not imported here; cores can use `signing`
without pulling in gRPC.
"""

from mesh.identity.ca import (
    Credentials,
    CredentialsError,
    CredentialsExistError,
    Fleet,
    FleetError,
    FleetExistsError,
    FleetFileError,
    FleetNotFoundError,
    InvalidNameError,
    Role,
    check_name,
    enroll,
    init_fleet,
    load_credentials,
    load_fleet,
    load_publisher_key,
    load_trusted_keys,
)
from mesh.identity.signing import (
    IdentityError,
    KeyFileError,
    KeyRole,
    KeyRoleError,
    SignatureError,
    SigningKey,
    TrustedKeys,
    UnknownKeyError,
    VerifyKey,
    canonical_json,
)

__all__ = [
    "Credentials",
    "CredentialsError",
    "CredentialsExistError",
    "Fleet",
    "FleetError",
    "FleetExistsError",
    "FleetFileError",
    "FleetNotFoundError",
    "IdentityError",
    "InvalidNameError",
    "KeyFileError",
    "KeyRole",
    "KeyRoleError",
    "Role",
    "SignatureError",
    "SigningKey",
    "TrustedKeys",
    "UnknownKeyError",
    "VerifyKey",
    "canonical_json",
    "check_name",
    "enroll",
    "init_fleet",
    "load_credentials",
    "load_fleet",
    "load_publisher_key",
    "load_trusted_keys",
]
