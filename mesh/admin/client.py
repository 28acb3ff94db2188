"""Operator's gRPC clients (blocking; used by the CLI): the channel, the operator-certificate
check and the error hints live in `OperatorClient`; each service (Admin, Decisions) adds its calls."""

from __future__ import annotations

import json

import grpc

from mesh._proto import admin_pb2 as pb
from mesh._proto import admin_pb2_grpc as pb_grpc
from mesh._proto import decisions_pb2 as decisions_pb
from mesh._proto import decisions_pb2_grpc as decisions_pb_grpc
from mesh._proto import trust_pb2 as trust_pb
from mesh._proto import trust_pb2_grpc as trust_pb_grpc
from mesh.identity.ca import Credentials, Role
from mesh.identity.tls import channel_credentials, secure_channel_options

_HINTS = {
    grpc.StatusCode.UNAVAILABLE: "is the node running, and is this certificate from the node's fleet?",
    grpc.StatusCode.PERMISSION_DENIED: "use an operator certificate",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the node did not answer in time",
}


class AdminError(Exception):
    """An operator call failed; the message says what to check. `.code` is the gRPC status
    (None for problems found before calling)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class OperatorClient:
    """An mTLS channel to one node with an operator certificate, and calls that fail with
    `error` (an AdminError subclass) carrying a hint."""

    error: type[AdminError] = AdminError
    stub_class: type = pb_grpc.AdminStub

    def __init__(self, address: str, credentials: Credentials, *, timeout_s: float = 5.0) -> None:
        if credentials.role is not Role.OPERATOR:
            raise self.error(f"{credentials.cert_path} is a {credentials.role.value} certificate; this "
                             "client needs an operator certificate (mesh fleet enroll NAME --role operator)")
        self.address = address
        self._timeout_s = timeout_s
        self._channel = grpc.secure_channel(address, channel_credentials(credentials),
                                            options=secure_channel_options(Role.NODE, None))
        self._stub = self.stub_class(self._channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            code = exc.code()
            hint = _HINTS.get(code, "")
            raise self.error(f"{self.address}: {code.name}: {exc.details()}" + (f" ({hint})" if hint else ""),
                             code) from None


class AdminClient(OperatorClient):
    """The Admin service: the node's view of the fleet, its models and its inference runtime."""

    def status(self) -> pb.StatusResponse:
        return self._call(self._stub.Status, pb.StatusRequest())

    def models(self) -> pb.ModelsResponse:
        return self._call(self._stub.Models, pb.ModelsRequest())

    def inference(self) -> pb.InferenceStatus:
        return self._call(self._stub.Inference, pb.InferenceStatusRequest())


class DecisionsError(AdminError):
    """A Decisions call failed; `.code` is the gRPC status (None for client-side problems)."""


class DecisionsClient(OperatorClient):
    """The Decisions service of a node's site group: held decisions, signed answers, routes, audit log.

    Approvals are signed by the caller, with the operator key on the operator's machine; the
    node only ever sees the signed approval."""

    error = DecisionsError
    stub_class = decisions_pb_grpc.DecisionsStub

    def __init__(self, address: str, credentials: Credentials, *, timeout_s: float = 8.0) -> None:
        super().__init__(address, credentials, timeout_s=timeout_s)

    def pending(self) -> decisions_pb.PendingResponse:
        return self._call(self._stub.Pending, decisions_pb.PendingRequest())

    def routes(self) -> decisions_pb.RoutesResponse:
        return self._call(self._stub.Routes, decisions_pb.RoutesRequest())

    def propose(self, decision_doc: dict) -> decisions_pb.DecisionResult:
        request = decisions_pb.ProposeRequest(decision_json=json.dumps(decision_doc))
        return self._call(self._stub.Propose, request)

    def approve(self, approval_doc: dict) -> decisions_pb.DecisionResult:
        request = decisions_pb.AnswerRequest(approval_json=json.dumps(approval_doc))
        return self._call(self._stub.Approve, request)

    def deny(self, approval_doc: dict) -> decisions_pb.DecisionResult:
        return self._call(self._stub.Deny, decisions_pb.AnswerRequest(approval_json=json.dumps(approval_doc)))

    def audit(self, *, verify: bool = False, limit: int = 0) -> decisions_pb.AuditResponse:
        return self._call(self._stub.Audit, decisions_pb.AuditRequest(verify=verify, limit=limit))


class TrustError(AdminError):
    """A Trust call (revocations) failed."""


class TrustClient(OperatorClient):
    """The Trust service: submit an operator-signed revocation, read the revocations a node enforces."""

    error = TrustError
    stub_class = trust_pb_grpc.TrustStub

    def revoke(self, revocation_json: bytes) -> trust_pb.RevokeReply:
        return self._call(self._stub.Revoke, trust_pb.RevokeRequest(revocation_json=revocation_json))

    def revocations(self) -> trust_pb.RevocationList:
        return self._call(self._stub.Revocations, trust_pb.RevocationsRequest())
