"""Mutual TLS over real gRPC on loopback, with fleet certificates.

The standard health service stands in for fleetmesh's own RPCs: what is under
test is the handshake and `peer_identity`, not the service.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from mesh.identity import Credentials, CredentialsError, InvalidNameError, Role, enroll, init_fleet
from mesh.identity.tls import (
    PeerIdentity,
    channel_credentials,
    peer_identity,
    secure_channel_options,
    server_credentials,
    target_name,
)

CALL_TIMEOUT_S = 5.0


class RecordingHealth(HealthServicer):
    """Health service that records who called it."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: list[PeerIdentity | None] = []

    async def Check(self, request, context):
        self.callers.append(peer_identity(context))
        return await super().Check(request, context)


@dataclass
class Server:
    port: int
    health: RecordingHealth = field(repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serving(creds: Credentials | None) -> AsyncIterator[Server]:
    """A health server on an ephemeral loopback port; plaintext when creds is None."""
    server = grpc.aio.server()
    health = RecordingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if creds is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", server_credentials(creds))
    await server.start()
    try:
        yield Server(port, health)
    finally:
        await server.stop(grace=None)


async def check(
    address: str,
    credentials: grpc.ChannelCredentials,
    options: list[tuple[str, str]],
) -> health_pb2.HealthCheckResponse:
    async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return await stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)


async def refused(
    address: str,
    credentials: grpc.ChannelCredentials,
    options: list[tuple[str, str]],
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check(address, credentials, options)
    return info.value


@dataclass(frozen=True)
class Members:
    server: Credentials  # node "hub"
    client: Credentials  # node "cam-1"
    imposter: Credentials  # node "cam-2", a real member that is not "hub"
    operator: Credentials  # operator "admin"
    stranger: Credentials  # node "hub" of another fleet


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> Members:
    ours: Path = tmp_path_factory.mktemp("ours")
    theirs: Path = tmp_path_factory.mktemp("theirs")
    init_fleet(ours)
    init_fleet(theirs)
    return Members(
        server=enroll(ours, "hub"),
        client=enroll(ours, "cam-1"),
        imposter=enroll(ours, "cam-2"),
        operator=enroll(ours, "admin", role=Role.OPERATOR, force=True),
        stranger=enroll(theirs, "hub"),
    )


@pytest_asyncio.fixture
async def hub(members: Members) -> AsyncIterator[Server]:
    async with serving(members.server) as server:
        yield server


def test_target_names() -> None:
    assert target_name(Role.NODE, "cam-17") == "cam-17.node.fleetmesh"
    assert target_name(Role.NODE, None) == "fleetmesh-node"
    assert target_name(Role.OPERATOR, "admin") == "admin.operator.fleetmesh"
    assert secure_channel_options(Role.NODE, "cam-17") == [
        ("grpc.ssl_target_name_override", "cam-17.node.fleetmesh")
    ]
    with pytest.raises(InvalidNameError):
        target_name(Role.NODE, "evil.node.fleetmesh/x")


@pytest.mark.asyncio
async def test_fleet_node_call_succeeds_and_server_sees_who_called(hub: Server, members: Members) -> None:
    response = await check(
        hub.address, channel_credentials(members.client), secure_channel_options(Role.NODE, "hub")
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert hub.health.callers == [PeerIdentity(name="cam-1", role=Role.NODE)]


@pytest.mark.asyncio
async def test_operator_is_identified_as_operator(hub: Server, members: Members) -> None:
    await check(hub.address, channel_credentials(members.operator), secure_channel_options(Role.NODE, "hub"))
    assert hub.health.callers == [PeerIdentity(name="admin", role=Role.OPERATOR)]


@pytest.mark.asyncio
async def test_seed_dial_accepts_any_fleet_node(hub: Server, members: Members) -> None:
    await check(hub.address, channel_credentials(members.client), secure_channel_options(Role.NODE, None))
    assert len(hub.health.callers) == 1


@pytest.mark.asyncio
async def test_client_without_certificate_is_refused(hub: Server, members: Members) -> None:
    ca_only = grpc.ssl_channel_credentials(root_certificates=members.client.ca_path.read_bytes())
    error = await refused(hub.address, ca_only, secure_channel_options(Role.NODE, "hub"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert hub.health.callers == []


@pytest.mark.asyncio
async def test_client_from_another_fleet_is_refused(hub: Server, members: Members) -> None:
    # The stranger trusts our CA (worst case); its own certificate is from its fleet's CA.
    stranger = grpc.ssl_channel_credentials(
        root_certificates=members.server.ca_path.read_bytes(),
        private_key=members.stranger.key_path.read_bytes(),
        certificate_chain=members.stranger.cert_path.read_bytes(),
    )
    error = await refused(hub.address, stranger, secure_channel_options(Role.NODE, "hub"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert hub.health.callers == []


@pytest.mark.asyncio
async def test_client_refuses_server_of_another_fleet(members: Members) -> None:
    async with serving(members.stranger) as fake_hub:
        error = await refused(
            fake_hub.address, channel_credentials(members.client), secure_channel_options(Role.NODE, "hub")
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert fake_hub.health.callers == []


@pytest.mark.asyncio
async def test_client_refuses_a_different_node_than_it_dialed(members: Members) -> None:
    async with serving(members.imposter) as not_hub:
        error = await refused(
            not_hub.address, channel_credentials(members.client), secure_channel_options(Role.NODE, "hub")
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert not_hub.health.callers == []
        # Dialed by its own id it is accepted: the refusal above is about the name.
        await check(
            not_hub.address, channel_credentials(members.client), secure_channel_options(Role.NODE, "cam-2")
        )


@pytest.mark.asyncio
async def test_operator_certificate_cannot_serve_as_a_node(members: Members) -> None:
    async with serving(members.operator) as server:
        for peer_id in ("admin", None):
            error = await refused(
                server.address,
                channel_credentials(members.client),
                secure_channel_options(Role.NODE, peer_id),
            )
            assert error.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio
async def test_dialing_without_the_name_override_fails(hub: Server, members: Members) -> None:
    # Fleet certificates name nodes, not IP addresses: the option is required.
    error = await refused(hub.address, channel_credentials(members.client), [])
    assert error.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio
async def test_peer_identity_is_none_without_tls() -> None:
    async with serving(None) as plain:
        async with grpc.aio.insecure_channel(plain.address) as channel:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
            )
        assert plain.health.callers == [None]


def test_unreadable_credentials_name_the_file(members: Members, tmp_path: Path) -> None:
    missing = Credentials(
        name="ghost",
        role=Role.NODE,
        cert_path=tmp_path / "cert.pem",
        key_path=tmp_path / "key.pem",
        ca_path=tmp_path / "ca.pem",
    )
    with pytest.raises(CredentialsError, match="cert.pem"):
        server_credentials(missing)


def test_key_from_another_certificate_is_refused(members: Members) -> None:
    mixed = Credentials(
        name="hub",
        role=Role.NODE,
        cert_path=members.server.cert_path,
        key_path=members.client.key_path,
        ca_path=members.server.ca_path,
    )
    with pytest.raises(CredentialsError, match="does not belong"):
        channel_credentials(mixed)
