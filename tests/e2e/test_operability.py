"""What operators see with grpcurl-like tools: health and reflection on both servers, no proto files needed."""

from __future__ import annotations

import json
import subprocess
import sysconfig
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from orders.v1 import queries_pb2
from tests.support import Stack, add_product, eventually, new_id, new_sku, place, scrape_metrics

SERVERS = [
    (lambda s: s.settings.command_addr, "orders.v1.CommandService", "relay"),
    (lambda s: s.settings.query_addr, "orders.v1.QueryService", "projection"),
    (lambda s: s.settings.admin_addr, "orders.v1.AdminService", None),
]


@pytest.mark.parametrize(("address_of", "service", "extra_status"), SERVERS)
def test_health_and_reflection(stack: Stack, address_of, service: str, extra_status: str | None) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(address_of(stack)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        listed = health.List(health_pb2.HealthListRequest(), timeout=5).statuses
        assert set(listed) == {"", service} | ({extra_status} if extra_status else set())
        assert listed[service].status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
            database.get_services()
        )
        pool = descriptor_pool.DescriptorPool(database)
        assert pool.FindServiceByName(service).methods  # full schema available without .proto files


@pytest.mark.parametrize(("address_of", "service", "extra_status"), SERVERS)
def test_reflection_v1_as_buf_curl_uses_it(stack: Stack, address_of, service: str, extra_status: str | None) -> None:  # type: ignore[no-untyped-def]
    listed = buf("--list-services", "--reflect-protocol", "grpc-v1", f"http://{address_of(stack)}").split()
    assert {service, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= set(listed)
    methods = buf("--list-methods", "--reflect-protocol", "grpc-v1", f"http://{address_of(stack)}").split()
    assert "grpc.reflection.v1.ServerReflection/ServerReflectionInfo" in methods
    assert "grpc.health.v1.Health/List" in methods


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


def counter(samples: dict[str, float], name: str, **labels: str) -> float:
    """A sample's value (0 when absent), matched by name and labels in the exposition's sorted order."""
    rendered = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return samples.get(f"{name}{{{rendered}}}" if labels else name, 0.0)


def test_every_process_serves_metrics_that_follow_the_traffic(stack: Stack) -> None:
    settings = stack.settings

    def scrape() -> dict[str, dict[str, float]]:
        return {
            "command": scrape_metrics(settings.command_metrics_addr),
            "query": scrape_metrics(settings.query_metrics_addr),
            "projector": scrape_metrics(settings.projector_metrics_addr),
        }

    def placed(s: dict[str, dict[str, float]]) -> float:
        return counter(
            s["command"], "orders_rpc_requests_total", code="OK", method="PlaceOrder", service="CommandService"
        )

    before = scrape()
    sku = new_sku("M")
    add_product(stack.commands, sku, stock=2)
    orders = [place(stack.commands, "metrics", (sku, 1)) for _ in range(2)]
    with pytest.raises(grpc.RpcError):
        place(stack.commands, "metrics", (sku, 1))  # out of stock
    stack.queries.GetOrderSummary(
        queries_pb2.GetOrderSummaryRequest(
            order_id=orders[-1].order_id, consistency_token=orders[-1].consistency_token
        ),
        timeout=10,
    )
    watch = stack.queries.WatchOrderSummaries(
        queries_pb2.WatchOrderSummariesRequest(order_ids=[orders[0].order_id], include_snapshot=True), timeout=30
    )
    next(watch)
    try:
        after = eventually(
            lambda: (
                (s := scrape())["query"]["orders_query_watch_streams"] >= 1
                and s["projector"]["orders_projector_events_applied_total"]
                >= before["projector"]["orders_projector_events_applied_total"] + 4
                and s
            ),
            10,
            "metrics moved",
        )
    finally:
        watch.cancel()
    assert placed(after) == placed(before) + 2
    refused = dict(code="FAILED_PRECONDITION", method="PlaceOrder", service="CommandService")
    assert counter(after["command"], "orders_rpc_requests_total", **refused) == (
        counter(before["command"], "orders_rpc_requests_total", **refused) + 1
    )
    latency = 'orders_rpc_duration_seconds_count{method="PlaceOrder",service="CommandService"}'
    assert after["command"][latency] >= before["command"].get(latency, 0) + 3
    assert (
        after["command"]["orders_outbox_published_events_total"]
        >= before["command"]["orders_outbox_published_events_total"] + 4  # product upsert + stock + 2 orders
    )
    assert after["command"]["orders_outbox_publish_seconds_count"] >= 4
    assert "orders_outbox_backlog_events" in after["command"]
    got = 'orders_rpc_duration_seconds_count{method="GetOrderSummary",service="QueryService"}'
    assert after["query"][got] >= before["query"].get(got, 0) + 1
    assert after["projector"]["orders_projector_batch_seconds_count"] > 0
    assert "orders_projection_lag_events" in after["projector"]
    assert "orders_projection_lag_events" in after["query"]
    assert not [name for name in after["command"] if name.startswith("orders_projection_")]  # it does not know it
    for process in after.values():
        assert 0 < process["process_resident_memory_bytes"] < 1e9


def buf(*args: str) -> str:
    """`buf curl` over plain HTTP/2 with args; its output. The schema comes from the server's reflection."""
    command = [
        str(Path(sysconfig.get_path("scripts")) / "buf"),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
    ]
    result = subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",  # away from protos/: nothing but reflection to go on
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def buf_curl(address: str, method: str, body: dict[str, object], *headers: str) -> dict[str, object]:
    """Call method with buf curl, which learns the schema from the server's reflection (no proto files)."""
    options = [option for header in headers for option in ("-H", header)]
    return json.loads(buf(*options, "-d", json.dumps(body), f"http://{address}/{method}"))  # type: ignore[no-any-return]


def test_buf_curl_places_an_order_and_reads_it_back_through_reflection_only(stack: Stack) -> None:
    commands, queries = stack.settings.command_addr, stack.settings.query_addr
    sku = new_sku("B")
    product: dict[str, object] = {
        "requestId": new_id(),
        "sku": sku,
        "name": "buf curl",
        "unitPrice": {"currencyCode": "EUR", "minorUnits": 250},
    }
    buf_curl(commands, "orders.v1.CommandService/UpsertProduct", product)
    buf_curl(commands, "orders.v1.CommandService/UpdateInventory", {"requestId": new_id(), "sku": sku, "setLevel": 3})
    placed = buf_curl(
        commands,
        "orders.v1.CommandService/PlaceOrder",
        {"requestId": new_id(), "customerId": "buf-user", "lines": [{"sku": sku, "quantity": 2}]},
        "x-correlation-id: buf-curl-1",
    )
    got = buf_curl(
        queries,
        "orders.v1.QueryService/GetOrderSummary",
        {"orderId": placed["orderId"], "consistencyToken": placed["consistencyToken"]},
    )
    summary = got["summary"]
    assert isinstance(summary, dict)
    assert (summary["customerId"], summary["total"], summary["status"]) == (
        "buf-user",
        {"currencyCode": "EUR", "minorUnits": "500"},
        "ORDER_STATUS_PLACED",
    )
    health = buf_curl(queries, "grpc.health.v1.Health/Check", {"service": "orders.v1.QueryService"})
    assert health == {"status": "SERVING"}
