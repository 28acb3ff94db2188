"""Who may call what: the role checks gRPC servicers make on their callers.

TLS proves only that a caller holds a certificate from the fleet CA; which member
may call which service is decided from the role its certificate names
(`tls.peer_identity`). Servicers call these checks at the top of each method, so
the rule sits next to the call it guards and reads the same in every service.
"""

from __future__ import annotations

import grpc

from mesh.identity.ca import Role
from mesh.identity.tls import peer_identity


async def require_operator(context: grpc.aio.ServicerContext) -> str:
    """Abort with PERMISSION_DENIED unless the caller holds an operator certificate; return its name.

    The Admin and Decisions services answer operators only."""
    peer = peer_identity(context)
    if peer is None or peer.role is not Role.OPERATOR:
        who = f"{peer.role.value} {peer.name!r}" if peer else "an unauthenticated caller"
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"admin calls need an operator certificate; this is {who}")
        raise AssertionError("grpc's context.abort returned")  # it raises; this tells type checkers
    return peer.name
