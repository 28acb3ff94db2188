"""Decisions gRPC servicer: operators read and answer their site group's decisions through any member.

Reads (Pending, Routes) go through a read barrier so a follower answers with the group's
current state; in a minority partition the node answers with its last committed state and
says so (`GroupView.current = false`) rather than failing: that is the table it keeps
serving on. A member that has heard from no leader for two election timeouts knows it is cut
off and answers at once. Every answer's `GroupView` carries the answering member's Raft state
(leader, term, commit and applied index, reachable members, time since it last heard from a
leader); `GroupStatus` returns that alone, with no barrier, plus each member's link.

Writes are proposed through this member's Raft group and forwarded to the leader by
pysyncobj; every replica verifies approvals inside its apply, so this node's answer is the
group's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import grpc

from mesh._proto import decisions_pb2 as pb
from mesh._proto import decisions_pb2_grpc as pb_grpc
from mesh.consensus.commands import CommandError
from mesh.consensus.group import SiteGroup
from mesh.consensus.ledger import ApplyResult, HeldDecision, Outcome
from mesh.consensus.raft import CommandRejected, NoLeaderError, ProposalTimeout, RaftError
from mesh.guard.approval import Approval, MalformedApproval
from mesh.guard.core import Decision, DecisionError
from mesh.identity.authz import require_operator
from mesh.identity.signing import canonical_json

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 256 * 1024
RECENT_HISTORY = 20
READ_BARRIER_TIMEOUT_S = 1.5
NO_RAFT = "this node has no [raft] section: it takes no local decisions; ask a node of the site's Raft group"


class DecisionsServicer(pb_grpc.DecisionsServicer):
    def __init__(self, group: SiteGroup | None) -> None:
        self._group = group

    async def _ready(self, context: grpc.aio.ServicerContext) -> SiteGroup:
        await require_operator(context)
        if self._group is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_RAFT)
            raise AssertionError("grpc's context.abort returned")  # it raises; this tells type checkers
        return self._group

    def _view(self, group: SiteGroup, *, current: bool, note: str = "",
              raft: dict[str, Any] | None = None) -> pb.GroupView:
        raft = raft if raft is not None else group.raft.status()
        return pb.GroupView(group=group.group, node_id=group.node_id, leader=raft["leader"] or "",
                            current=current, note=note, group_size=group.group_size,
                            applied_index=raft["applied_index"], term=raft["term"],
                            commit_index=raft["commit_index"], raft_state=raft["state"],
                            members=raft["members"], reachable=raft["reachable"],
                            leader_contact_s=raft["leader_contact_s"], cut_off=raft["cut_off"],
                            no_leader_after_s=raft["no_leader_after_s"])

    async def _read_view(self, group: SiteGroup) -> pb.GroupView:
        try:
            await group.sync(READ_BARRIER_TIMEOUT_S)
        except RaftError as exc:
            return self._view(group, current=False,
                              note=f"no leader reachable, showing this node's last committed state ({exc})")
        return self._view(group, current=True)

    async def Pending(self, request: pb.PendingRequest, context) -> pb.PendingResponse:
        group = await self._ready(context)
        view = await self._read_view(group)
        held = [_held_info(group, h) for h in group.pending()]
        recent = [pb.HistoryItem(decision_id=e.decision_id or "", outcome=e.outcome, at=e.at, detail=e.detail,
                                 key_id=e.key_id or "") for e in group.history()[-RECENT_HISTORY:]]
        return pb.PendingResponse(group=view, held=held, recent=recent)

    async def Routes(self, request: pb.RoutesRequest, context) -> pb.RoutesResponse:
        group = await self._ready(context)
        view = await self._read_view(group)
        return pb.RoutesResponse(group=view, routes=group.routes(), allocations=group.allocations())

    async def Propose(self, request: pb.ProposeRequest, context) -> pb.DecisionResult:
        group = await self._ready(context)
        doc = await _json_arg(context, request.decision_json, "decision_json")
        try:
            decision = Decision.from_dict(doc)
        except DecisionError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if decision.group != group.group:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"decision.group is {decision.group!r}, but this node is in group "
                                f"{group.group!r}; send it to a node of that group")
        return await self._write(context, group, group.propose(decision))

    async def Approve(self, request: pb.AnswerRequest, context) -> pb.DecisionResult:
        return await self._answer(request, context, approve=True)

    async def Deny(self, request: pb.AnswerRequest, context) -> pb.DecisionResult:
        return await self._answer(request, context, approve=False)

    async def _answer(self, request: pb.AnswerRequest, context, *, approve: bool) -> pb.DecisionResult:
        group = await self._ready(context)
        doc = await _json_arg(context, request.approval_json, "approval_json")
        try:
            approval = Approval.from_dict(doc)
        except MalformedApproval as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if approval.approve is not approve:
            rpc, other = ("Approve", "Deny") if approve else ("Deny", "Approve")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{rpc} got a signed approval with approve={str(approval.approve).lower()}; "
                                f"send it with {other}")
        submit = group.approve(approval) if approve else group.deny(approval)
        # Proposed even for an unknown id: every replica audits the attempt, then NOT_FOUND says why.
        reply = await self._write(context, group, submit)
        if reply.outcome == Outcome.REFUSED.value and reply.refusal_reason == "not_pending" \
                and group.outcome_of(approval.decision_id) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"decision {approval.decision_id} is not held in group {group.group} "
                                "(unknown, or finished long ago); list held decisions with "
                                "`mesh admin pending`")
        return reply

    async def _write(self, context, group: SiteGroup, submit) -> pb.DecisionResult:
        try:
            result: ApplyResult = await submit
        except NoLeaderError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ProposalTimeout as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except CommandError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except CommandRejected as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        except RaftError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        reason = ""
        if result.outcome is Outcome.REFUSED:
            reason = next((str(e.payload.get("reason", "")) for e in reversed(result.audit)
                           if e.kind == "refused"), "")
        return pb.DecisionResult(group=self._view(group, current=True), outcome=result.outcome.value,
                                 decision_id=result.decision_id or "", message=result.message,
                                 refusal_reason=reason)

    async def GroupStatus(self, request: pb.GroupStatusRequest, context) -> pb.GroupStatusResponse:
        group = await self._ready(context)
        raft = group.raft.status()
        leader = raft["leader"]
        links = [pb.MemberLink(node_id=node, reachable=node in raft["reachable"],
                               last_heard_s=-1.0 if heard is None else heard, leader=node == leader)
                 for node, heard in sorted(raft["last_heard_s"].items())]
        view = self._view(group, current=False, raft=raft,
                          note="this member's own view of its Raft group, read without a barrier")
        return pb.GroupStatusResponse(group=view, links=links, log_entries=raft["log_entries"],
                                      held=len(group.pending()),
                                      audit_error=group.status()["audit_error"] or "")

    async def Audit(self, request: pb.AuditRequest, context) -> pb.AuditResponse:
        group = await self._ready(context)
        # Reading and hashing the whole log is file work: keep it off the event loop.
        records = await asyncio.to_thread(group.audit_records)
        shown = records[-request.limit:] if request.limit else records
        entries = [pb.AuditEntry(seq=r.seq, time=r.time, kind=r.kind,
                                 payload_json=canonical_json(dict(r.payload)).decode(), prev=r.prev,
                                 hash=r.hash)
                   for r in shown]
        verdict = pb.AuditVerdictInfo(checked=False)
        if request.verify:
            v = await asyncio.to_thread(group.verify_audit)
            verdict = pb.AuditVerdictInfo(checked=True, ok=v.ok, records=v.records,
                                          first_bad_seq=v.first_bad_seq or 0, reason=v.reason,
                                          head_hash=v.head_hash)
        return pb.AuditResponse(group=self._view(group, current=False, note="this node's own audit log"),
                                path=str(group.audit_path), total_records=len(records), records=entries,
                                verdict=verdict)


def _held_info(group: SiteGroup, held: HeldDecision) -> pb.HeldDecisionInfo:
    d = held.decision
    limits = group.policy.limits_for(d.kind)
    return pb.HeldDecisionInfo(
        decision_id=d.decision_id, kind=d.kind.value, proposer=d.proposer, reason=d.reason,
        proposed_at=d.proposed_at, held_at=held.held_at, expires_at=held.expires_at,
        nodes_affected=held.scope.nodes_affected, fraction_of_group=held.scope.fraction_of_group,
        streams_moved=held.scope.streams_moved, max_nodes=limits.max_nodes, max_fraction=limits.max_fraction,
        max_streams=limits.max_streams, exceeded=list(held.exceeded), describe=d.describe(),
        waiting_for=held.waiting_for, decision_json=canonical_json(d.to_dict()).decode(), digest=d.digest())


async def _json_arg(context, text: str, field: str) -> object:
    if not text:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} is empty")
    if len(text.encode()) > MAX_JSON_BYTES:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{field} is larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} is not valid JSON: {exc}")
        # It raises; this tells type checkers.
        raise AssertionError("grpc's context.abort returned") from None


def add_to_server(server: grpc.aio.Server, group: SiteGroup | None) -> DecisionsServicer:
    """Serve the Decisions service; with `group` None every call is FAILED_PRECONDITION (no [raft])."""
    servicer = DecisionsServicer(group)
    pb_grpc.add_DecisionsServicer_to_server(servicer, server)
    return servicer
