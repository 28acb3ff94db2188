"""Operator's gRPC client for the admin service (blocking; used by the CLI)."""

from __future__ import annotations

import grpc

from mesh._proto import admin_pb2 as pb
from mesh._proto import admin_pb2_grpc as pb_grpc
from mesh.identity.ca import Credentials, Role
from mesh.identity.tls import channel_credentials, secure_channel_options


class AdminError(Exception):
    """An admin call failed; the message says what to check."""


class AdminClient:
    def __init__(self, address: str, credentials: Credentials, *, timeout_s: float = 5.0) -> None:
        if credentials.role is not Role.OPERATOR:
            raise AdminError(f"{credentials.cert_path} is a {credentials.role.value} certificate; "
                             "the admin client needs an operator certificate (mesh fleet enroll NAME --role operator)")
        self.address = address
        self._timeout_s = timeout_s
        self._channel = grpc.secure_channel(address, channel_credentials(credentials),
                                            options=secure_channel_options(Role.NODE, None))
        self._stub = pb_grpc.AdminStub(self._channel)

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc) -> None:
        self._channel.close()

    def status(self) -> pb.StatusResponse:
        return self._call(self._stub.Status, pb.StatusRequest())

    def models(self) -> pb.ModelsResponse:
        return self._call(self._stub.Models, pb.ModelsRequest())

    def inference(self) -> pb.InferenceStatus:
        return self._call(self._stub.Inference, pb.InferenceStatusRequest())

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            code = exc.code()
            hint = {
                grpc.StatusCode.UNAVAILABLE: "is the node running, and is this certificate from the node's fleet?",
                grpc.StatusCode.PERMISSION_DENIED: "use an operator certificate",
                grpc.StatusCode.DEADLINE_EXCEEDED: "the node did not answer in time",
            }.get(code, "")
            raise AdminError(f"{self.address}: {code.name}: {exc.details()}" + (f" ({hint})" if hint else "")) from None
