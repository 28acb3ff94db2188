"""What README's grpcurl and grpc_health_probe examples do, done with grpcio's own health and
reflection clients (neither tool is packaged for Debian, and this machine downloads nothing
else): an operator certificate, the fleet CA, and the TLS server name `fleetmesh-node` (or
`<id>.node.fleetmesh`), never the IP the node is dialed at."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from mesh.identity.tls import TARGET_NAME_OPTION, channel_credentials
from mesh.node.runtime import SERVICE_NAMES

pytestmark = pytest.mark.asyncio

REFLECTION = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")


def channel(node, fleet, server_name: str) -> grpc.aio.Channel:
    """As `grpcurl -cacert ca.pem -cert cert.pem -key key.pem -servername NAME ADDRESS`."""
    return grpc.aio.secure_channel(node.address, channel_credentials(fleet.operator),
                                   options=[(TARGET_NAME_OPTION, server_name)])


@pytest.mark.parametrize("server_name", ["fleetmesh-node", "node-00.node.fleetmesh"])
async def test_health_checks_with_the_documented_server_name(cluster, fleet, server_name):
    """`grpc_health_probe -addr ADDRESS -tls -tls-ca-cert ... -tls-server-name fleetmesh-node`."""
    c = await cluster(1)
    async with channel(c.nodes["node-00"], fleet, server_name) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", *SERVICE_NAMES):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_the_ip_address_as_server_name_fails_the_handshake(cluster, fleet):
    c = await cluster(1)
    node = c.nodes["node-00"]
    async with channel(node, fleet, node.address.split(":")[0]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_reflection_v1alpha_lists_and_describes_every_service(cluster, fleet):
    """`grpcurl ... list` and `grpcurl ... describe mesh.v1.Admin` (v1alpha, grpcio's own client)."""
    c = await cluster(1)
    node = c.nodes["node-00"]
    host_channel = grpc.secure_channel(node.address, channel_credentials(fleet.operator),
                                       options=[(TARGET_NAME_OPTION, "fleetmesh-node")])

    def ask() -> tuple[list[str], list[str]]:
        with host_channel:
            database = ProtoReflectionDescriptorDatabase(host_channel)
            pool = descriptor_pool.DescriptorPool(database)
            admin = pool.FindServiceByName("mesh.v1.Admin")
            return database.get_services(), [m.name for m in admin.methods]

    services, admin_methods = await asyncio.to_thread(ask)
    assert set(services) >= {*SERVICE_NAMES, "grpc.health.v1.Health", *REFLECTION}
    assert {"Status", "Models", "Inference"} <= set(admin_methods)


async def test_reflection_v1_answers_as_v1alpha_does(cluster, fleet):
    """grpcurl 1.8+ asks grpc.reflection.v1 first; grpcio ships no v1 client, so call it by name."""
    c = await cluster(1)
    async with channel(c.nodes["node-00"], fleet, "fleetmesh-node") as ch:
        answers = {}
        for service in REFLECTION:
            call = ch.stream_stream(f"/{service}/ServerReflectionInfo",
                                    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)

            async def requests():
                yield reflection_pb2.ServerReflectionRequest(list_services="")
                yield reflection_pb2.ServerReflectionRequest(file_containing_symbol="mesh.v1.Admin")
                yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=REFLECTION[0])

            answers[service] = [r async for r in call(requests(), timeout=10)]
    v1, v1alpha = (answers[s] for s in REFLECTION)
    assert [r.SerializeToString() for r in v1] == [r.SerializeToString() for r in v1alpha]
    listed = {s.name for s in v1[0].list_services_response.service}
    assert listed >= {*SERVICE_NAMES, *REFLECTION}
    assert all(r.file_descriptor_response.file_descriptor_proto for r in v1[1:])
