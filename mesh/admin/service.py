"""Admin gRPC servicer: answers operators (operator certificates only)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from mesh import __version__
from mesh._proto import admin_pb2 as pb
from mesh._proto import admin_pb2_grpc as pb_grpc
from mesh._proto import membership_pb2
from mesh.guard.audit import AuditVerdict
from mesh.identity.authz import require_operator
from mesh.membership.core import Membership

if TYPE_CHECKING:
    from mesh.node.federation import FederationMember


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, core: Membership, now: Callable[[], float], started_at: float, *,
                 models: Callable[[], list[dict]] | None = None,
                 inference: Callable[[], dict] | None = None,
                 audit: Callable[[], tuple[Path, AuditVerdict]] | None = None,
                 federation: FederationMember | None = None) -> None:
        """`audit()`: the site group's audit log and what checking its tail at start found
        (None: the node has no [raft] section). `federation`: sites mode's federation member
        (None: flat mode)."""
        self._core = core
        self._federation = federation
        self._audit = audit
        self._now = now
        self._started_at = started_at
        self._models = models or (lambda: [])
        self._inference = inference or (lambda: {})

    async def Inference(self, request: pb.InferenceStatusRequest, context) -> pb.InferenceStatus:
        await require_operator(context)
        return pb.InferenceStatus(**self._inference())

    async def Models(self, request: pb.ModelsRequest, context) -> pb.ModelsResponse:
        await require_operator(context)
        return pb.ModelsResponse(versions=[pb.ModelVersion(**row) for row in self._models()])

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        await require_operator(context)
        now = self._now()
        me = self._core.member(self._core.node_id)
        if me is None:  # the core lists itself from its start
            raise RuntimeError(f"membership of {self._core.node_id} does not list the node itself")

        def rows(core: Membership) -> list[pb.MemberStatus]:
            return [
                # The enum's number: the stub names only MemberState, protobuf takes either.
                pb.MemberStatus(node_id=m.node_id, address=m.address,
                                state=cast(membership_pb2.MemberState, int(m.state)),
                                incarnation=m.incarnation, labels=dict(m.labels),
                                last_heard_s_ago=-1.0 if m.last_heard is None
                                else max(0.0, now - m.last_heard),
                                state_age_s=max(0.0, now - m.state_since))
                for m in core.members()
            ]

        fed = self._federation
        fed_runner = fed.runner if fed is not None else None
        return pb.StatusResponse(node_id=me.node_id, address=me.address, labels=dict(me.labels),
                                 incarnation=me.incarnation, version=__version__,
                                 uptime_s=now - self._started_at, members=rows(self._core),
                                 audit=self._audit_check(), pools="flat" if fed is None else "sites",
                                 representatives=fed.representatives if fed is not None else (),
                                 representative=fed_runner is not None,
                                 federation=rows(fed_runner.core) if fed_runner is not None else ())

    def _audit_check(self) -> pb.AuditCheck:
        if self._audit is None:
            return pb.AuditCheck(checked=False)
        path, verdict = self._audit()
        return pb.AuditCheck(checked=True, ok=verdict.ok, records=verdict.records,
                             first_bad_seq=verdict.first_bad_seq or 0, reason=verdict.reason, path=str(path))
