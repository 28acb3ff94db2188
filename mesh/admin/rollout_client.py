"""The operator's client of a node's Rollouts service (blocking; used by `mesh rollout` and
`mesh admin pending`)."""

from __future__ import annotations

import json
from typing import Any

from mesh._proto import rollout_pb2 as pb
from mesh._proto import rollout_pb2_grpc as pb_grpc
from mesh.admin.client import AdminError, OperatorClient


class RolloutClientError(AdminError):
    """A Rollouts call failed; `.code` is the gRPC status (None for client-side problems)."""


class RolloutClient(OperatorClient):
    """Start rollouts, send signed commands, read where rollouts stand. Plans and commands are signed by
    the caller, with the publisher's or the operator's key on their own machine."""

    error = RolloutClientError
    stub_class = pb_grpc.RolloutsStub

    def __init__(self, address, credentials, *, timeout_s: float = 10.0) -> None:
        super().__init__(address, credentials, timeout_s=timeout_s)

    def manifests(self, model: str, versions: list[str]) -> pb.GetManifestsResponse:
        return self._call(self._stub.GetManifests, pb.GetManifestsRequest(model=model, versions=versions))

    def documents(self, rollout_id: str) -> pb.RolloutDocuments:
        return self._call(self._stub.GetRollout, pb.GetRolloutRequest(rollout_id=rollout_id))

    def start(self, signed_plan_json: str) -> pb.RolloutResult:
        return self._call(self._stub.Start, pb.StartRequest(signed_plan_json=signed_plan_json))

    def command(self, command_json: str) -> pb.RolloutResult:
        return self._call(self._stub.Command, pb.CommandRequest(command_json=command_json))

    def status(self, rollout_id: str = "") -> dict[str, Any]:
        reply = self._call(self._stub.Status, pb.RolloutStatusRequest(rollout_id=rollout_id))
        return json.loads(reply.report_json)

    def list(self) -> list[dict[str, Any]]:
        return json.loads(self._call(self._stub.List, pb.RolloutListRequest()).rollouts_json)
