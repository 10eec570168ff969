"""What operators see with grpcurl-like tools: health and reflection on both servers, no proto files needed."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.support import Stack

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("address_of", "service"),
    [
        (lambda s: s.settings.command_addr, "orders.v1.CommandService"),
        (lambda s: s.settings.query_addr, "orders.v1.QueryService"),
    ],
)
def test_health_and_reflection(stack: Stack, address_of, service: str) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(address_of(stack)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
            database.get_services()
        )
        pool = descriptor_pool.DescriptorPool(database)
        assert pool.FindServiceByName(service).methods  # full schema available without .proto files


def test_a_call_built_only_from_reflection(stack: Stack) -> None:
    """What grpcurl does: learn the schema from the server, build JSON requests, call."""
    with grpc.insecure_channel(stack.settings.command_addr) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName("orders.v1.CommandService").methods_by_name["UpsertProduct"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(
            '{"request_id": "reflection-1", "sku": "REFLECT-1", "name": "Mirror",'
            ' "unit_price": {"currency_code": "EUR", "minor_units": 1500}}',
            request_class(),
        )
        call = channel.unary_unary(
            "/orders.v1.CommandService/UpsertProduct",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        reply = json_format.MessageToDict(call(request, timeout=5), preserving_proto_field_name=True)
    assert reply["sku"] == "REFLECT-1" and reply["version"] == "1" and reply["consistency_token"]
