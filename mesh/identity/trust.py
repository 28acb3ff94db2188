"""Which peers a node trusts right now: revocations it enforces (persisted, spread by gossip and
anti-entropy) and certificate expiry, answered on every call by `TrustStore.refusal`.

- `TrustStore` (the node's state): the verified `RevocationSet`, kept in
  ``data_dir/revocations.json`` (written atomically, verified entry by entry on load), and
  the refusal rule every service and the Raft transport apply.
- `TrustServicer`: operators submit signed revocations; nodes and operators read the set.

How revocations spread between nodes (metadata digests and fetches) is the node's
(mesh/node/revocations.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from mesh._proto import trust_pb2 as pb
from mesh._proto import trust_pb2_grpc as pb_grpc
from mesh.durable import write_file_atomic
from mesh.identity.authz import require_operator
from mesh.identity.ca import Role
from mesh.identity.revocation import Revocation, RevocationError, RevocationSet, parse_revocation
from mesh.identity.signing import TrustedKeys
from mesh.identity.tls import PeerIdentity, peer_identity

log = logging.getLogger("mesh.identity.trust")

REVOCATIONS_FILE = "revocations.json"
DIGEST_PREFIX_BYTES = 16


class TrustStore:
    """The revocations this node enforces, persisted under `data_dir`; `on_revoked` callbacks
    run (on the caller's thread) for each revocation new to this node."""

    def __init__(self, data_dir: Path, trusted: TrustedKeys, *,
                 on_revoked: Sequence[Callable[[Revocation], None]] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self._path = Path(data_dir) / REVOCATIONS_FILE
        self._trusted = trusted
        self._on_revoked = list(on_revoked)
        self._clock = clock
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            data = b"[]"
        try:
            self.revocations = RevocationSet.from_json(data, trusted)
        except RevocationError as exc:
            raise RevocationError(f"{self._path}: {exc}; move the file away (peers will send their "
                                  "revocations again) or restore it from a backup") from None

    def add(self, revocation: Revocation) -> bool:
        """Verify, persist and enforce a revocation; True if it was new. RevocationError if it is not
        an operator's."""
        if not self.revocations.add(revocation):
            return False
        self._save()
        log.warning("enforcing revocation: %s", revocation.describe())
        for callback in self._on_revoked:
            callback(revocation)
        return True

    def merge(self, revocations: RevocationSet | Sequence[Revocation]) -> int:
        """Add each valid revocation of a peer's set; return how many were new."""
        return sum(self.add(r) for r in revocations)

    def refusal(self, peer: PeerIdentity) -> str | None:
        """Why a call with `peer`'s certificate is refused (revoked, expired), or None."""
        revocation = self.revocations.revoked(peer.name, peer.serial, peer.not_before)
        if revocation is not None:
            return f"the certificate of {peer.role.value} {peer.name} is revoked: {revocation.describe()}"
        if peer.not_after < self._clock():
            return (f"the certificate of {peer.role.value} {peer.name} expired; "
                    "renew it with `mesh fleet renew`")
        return None

    def is_revoked_id(self, node_id: str) -> bool:
        """Whether `node_id` itself is revoked (every certificate of it issued before the revocation):
        it is not dialled, is seen dead, and leaves its Raft group. A revoked serial only (an old
        certificate, after a renewal) is refused per call and leaves the node trusted."""
        return node_id in self.revocations.revoked_ids()

    def revocation_of(self, node_id: str) -> Revocation | None:
        """The newest revocation of `node_id` itself (not of one serial), or None: the authority a site
        leader removes it from its group with."""
        if not self.is_revoked_id(node_id):
            return None
        return max((r for r in self.revocations if r.node_id == node_id and not r.serial),
                   key=lambda r: r.revoked_at)

    def digest_prefix(self) -> bytes:
        """What this node announces in its metadata: empty while it knows no revocation."""
        return bytes.fromhex(self.revocations.digest)[:DIGEST_PREFIX_BYTES] if len(self.revocations) else b""

    def _save(self) -> None:
        write_file_atomic(self._path, self.revocations.to_json(), 0o644)


class TrustServicer(pb_grpc.TrustServicer):
    def __init__(self, store: TrustStore, announce: Callable[[], None]) -> None:
        self._store = store
        self._announce = announce

    async def Revoke(self, request: pb.RevokeRequest, context: grpc.aio.ServicerContext) -> pb.RevokeReply:
        operator = await require_operator(context)
        try:
            revocation = parse_revocation(request.revocation_json)
            added = self._store.add(revocation)
        except RevocationError as exc:
            log.warning("refused a revocation submitted by operator %s: %s", operator, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if added:
            self._announce()
        return pb.RevokeReply(added=added, node_id=revocation.node_id, description=revocation.describe(),
                              known=len(self._store.revocations))

    async def Revocations(self, request: pb.RevocationsRequest,
                          context: grpc.aio.ServicerContext) -> pb.RevocationList:
        peer = peer_identity(context)
        if peer is None or peer.role not in (Role.NODE, Role.OPERATOR):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "revocations are read with a fleet certificate")
        revocations = self._store.revocations
        return pb.RevocationList(revocations_json=revocations.to_json(), digest=revocations.digest)
