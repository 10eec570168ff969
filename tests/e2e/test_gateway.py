"""The HTTP/JSON gateway (Connect protocol) in front of a running system with authentication on: every
contract over JSON and binary protobuf, server streaming, gRPC-Web, tokens and correlation ids passed
through, error details as Connect error details, CORS, and hostile HTTP input."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from connectrpc.compat import google_protobuf_json_codec
from connectrpc.protocol import ProtocolType
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders import local_stack
from orders.config import Settings
from orders.db import libpq_url
from orders.gateway.app import SERVICES
from orders.v1 import commands_pb2, common_pb2, queries_pb2
from orders.v1.queries_connect import QueryServiceClientSync
from tests.e2e.gateway_harness import READER, SHOP, Gateway, add_product, gateway_system, start_gateway
from tests.support import Infra, eventually, new_sku


@pytest.fixture(scope="module")
def gateway(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway_system(infra, tmp_path_factory.mktemp("gateway")) as running:
        yield running


def details(answer: dict[str, Any]) -> dict[str, Any]:
    """A Connect error's details, decoded: type name -> message."""
    types = {
        "google.rpc.BadRequest": error_details_pb2.BadRequest,
        "google.rpc.PreconditionFailure": error_details_pb2.PreconditionFailure,
    }
    found = {}
    for detail in answer.get("details", []):
        value = base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4))
        found[detail["type"]] = types[detail["type"]].FromString(value)
    return found


def count_orders(settings: Settings) -> int:
    with psycopg.connect(libpq_url(settings.write_database_url)) as conn:
        row = conn.execute("SELECT count(*) FROM orders").fetchone()
    assert row is not None
    return int(row[0])


def test_place_order_and_read_it_back_with_its_consistency_token_over_json(gateway: Gateway) -> None:
    sku = new_sku("G")
    add_product(gateway, sku)
    correlation = f"corr-{uuid.uuid4().hex[:8]}"
    status, headers, body = gateway.post(
        "/orders.v1.CommandService/PlaceOrder",
        json.dumps(
            {"requestId": str(uuid.uuid4()), "customerId": "http-1", "lines": [{"sku": sku, "quantity": 2}]}
        ).encode(),
        token=SHOP,
        headers={"X-Correlation-Id": correlation},
    )
    assert status == 200, body
    assert {k.lower(): v for k, v in headers.items()}.get("x-correlation-id") == correlation
    placed = json.loads(body)
    status, answer = gateway.rpc(
        "QueryService/GetOrderSummary",
        {"orderId": placed["orderId"], "consistencyToken": placed["consistencyToken"]},
        token=READER,
    )
    assert status == 200, answer
    summary = answer["summary"]
    assert (summary["orderId"], summary["status"], summary["itemCount"]) == (
        placed["orderId"],
        "ORDER_STATUS_PLACED",
        "2",
    )
    assert summary["total"] == {"currencyCode": "EUR", "minorUnits": "500"}


def test_binary_protobuf_bodies(gateway: Gateway) -> None:
    sku = new_sku("B")
    add_product(gateway, sku)
    request = commands_pb2.PlaceOrderRequest(
        request_id=str(uuid.uuid4()), customer_id="proto-1", lines=[commands_pb2.PlaceOrderLine(sku=sku, quantity=1)]
    )
    status, headers, body = gateway.post(
        "/orders.v1.CommandService/PlaceOrder", request.SerializeToString(), content_type="application/proto"
    )
    assert status == 200 and headers["content-type"] == "application/proto"
    assert commands_pb2.PlaceOrderResponse.FromString(body).order_id


@pytest.mark.parametrize("protocol", [ProtocolType.CONNECT, ProtocolType.GRPC_WEB], ids=["connect", "grpc-web"])
def test_server_stream_follows_a_cancellation(gateway: Gateway, protocol: ProtocolType) -> None:
    sku = new_sku("W")
    add_product(gateway, sku)
    customer = f"watch-{uuid.uuid4().hex[:6]}"
    status, placed = gateway.rpc(
        "CommandService/PlaceOrder",
        {"requestId": str(uuid.uuid4()), "customerId": customer, "lines": [{"sku": sku, "quantity": 1}]},
    )
    assert status == 200, placed
    with QueryServiceClientSync(gateway.url, protocol=protocol, codec=google_protobuf_json_codec()) as client:
        stream = client.watch_order_summaries(
            queries_pb2.WatchOrderSummariesRequest(
                customer_id=customer, include_snapshot=True, consistency_token=placed["consistencyToken"]
            ),
            headers={"authorization": f"Bearer {READER}"},
            timeout_ms=30_000,
        )
        first = next(iter(stream))
        assert (first.summary.order_id, first.snapshot) == (placed["orderId"], True)
        status, answer = gateway.rpc(
            "CommandService/CancelOrder",
            {"requestId": str(uuid.uuid4()), "orderId": placed["orderId"], "reason": "http"},
        )
        assert status == 200, answer
        for change in stream:
            if change.summary.order_id == placed["orderId"] and not change.snapshot:
                assert common_pb2.OrderStatus.Name(change.summary.status) == "ORDER_STATUS_CANCELLED"
                break


def test_errors_arrive_as_connect_errors_with_their_details(gateway: Gateway) -> None:
    before = count_orders(gateway.settings)
    status, answer = gateway.rpc(
        "CommandService/PlaceOrder", {"requestId": str(uuid.uuid4()), "customerId": "", "lines": []}
    )
    assert (status, answer["code"]) == (400, "invalid_argument"), answer
    violations = details(answer)["google.rpc.BadRequest"].field_violations
    assert {v.field for v in violations} >= {"customer_id", "lines"}

    sku = new_sku("S")
    add_product(gateway, sku, stock=1)
    status, answer = gateway.rpc(
        "CommandService/PlaceOrder",
        {"requestId": str(uuid.uuid4()), "customerId": "c", "lines": [{"sku": sku, "quantity": 5}]},
    )
    assert (status, answer["code"]) == (400, "failed_precondition"), answer
    assert details(answer)["google.rpc.PreconditionFailure"].violations[0].subject

    assert gateway.rpc("QueryService/GetOrderSummary", {"orderId": "nope"}, token=None)[1]["code"] == "unauthenticated"
    assert gateway.rpc("AdminService/GetProjectionLag", {}, token=SHOP)[1]["code"] == "permission_denied"
    assert (
        gateway.rpc("QueryService/GetOrderSummary", {"orderId": str(uuid.uuid4())}, token=READER)[1]["code"]
        == "not_found"
    )
    assert count_orders(gateway.settings) == before


HOSTILE_BODIES = [
    b"", b"{", b"[]", b"null", b'"text"', b"\xff\xfe\x00garbage", b'{"lines": "not a list"}',
    b'{"lines": [{"quantity": "many"}]}', b'{"lines": [{"quantity": 1e999}]}', b'{"requestId": {"nested": [[[[]]]]}}',
    b'{"customerId": "' + b"\\u0000" * 50 + b'"}', b"[" * 10_000 + b"]" * 10_000,
    b'{"lines": [' + b'{"sku": "x", "quantity": 1},' * 200 + b'{"sku": "x", "quantity": 1}]}',
]  # fmt: skip


def test_hostile_json_never_internal_and_writes_nothing(gateway: Gateway) -> None:
    before = count_orders(gateway.settings)
    for body in HOSTILE_BODIES:
        status, _, answer = gateway.post("/orders.v1.CommandService/PlaceOrder", body)
        assert 400 <= status < 500, (body[:60], status, answer[:300])
        if answer:
            assert json.loads(answer)["code"] not in ("internal", "unknown"), (body[:60], answer[:300])
    status, _, answer = gateway.post("/orders.v1.CommandService/PlaceOrder", b'{"x": "' + b"y" * (2 << 20) + b'"}')
    assert (status, json.loads(answer)["code"]) == (429, "resource_exhausted") or status == 413, (status, answer[:200])
    status, _, _ = gateway.post("/orders.v1.CommandService/PlaceOrder", b"{}", content_type="text/plain")
    assert status == 415
    status, _, _ = gateway.post("/orders.v1.CommandService/NoSuchMethod", b"{}")
    assert status == 404
    for service, _ in SERVICES.values():  # every method, unary and streaming, refuses junk the same way
        for method in service.methods:
            content_type = "application/connect+json" if method.server_streaming else "application/json"
            for junk in (b"{", b"[1,2]", b"\xff\xfe", b'{"id": {}}'[:-1]):  # never a valid message
                body = len(junk).to_bytes(5, "big") + junk if method.server_streaming else junk  # Connect envelope
                status, _, answer = gateway.post(f"/{service.full_name}/{method.name}", body, content_type=content_type)
                assert status != 500 and b'"internal"' not in answer and b'"unknown"' not in answer, (
                    method.full_name,
                    body,
                    status,
                    answer[:300],
                )
    assert count_orders(gateway.settings) == before


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda children: (
            st.lists(children)
            | st.dictionaries(st.sampled_from(["requestId", "customerId", "lines", "sku", "quantity", "x"]), children)
        ),
        max_leaves=20,
    )
)
@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_json_is_answered_with_a_client_error_or_ok(gateway: Gateway, value: Any) -> None:
    status, _, answer = gateway.post("/orders.v1.CommandService/PlaceOrder", json.dumps(value).encode())
    assert status == 200 or 400 <= status < 500, (value, status, answer[:300])
    if status != 200:
        assert json.loads(answer)["code"] not in ("internal", "unknown"), (value, answer[:300])


def test_cors_is_off_by_default_and_allows_only_configured_origins(gateway: Gateway, tmp_path: Path) -> None:
    def preflight(url: str, origin: str) -> dict[str, str]:
        request = urllib.request.Request(url + "/orders.v1.QueryService/GetOrderSummary", method="OPTIONS")
        request.add_header("Origin", origin)
        request.add_header("Access-Control-Request-Method", "POST")
        request.add_header("Access-Control-Request-Headers", "content-type,authorization,connect-protocol-version")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as error:
            return {k.lower(): v for k, v in error.headers.items()}

    assert "access-control-allow-origin" not in preflight(gateway.url, "https://shop.example")
    settings = replace(
        gateway.settings,
        gateway_addr=f"127.0.0.1:{local_stack.free_port()}",
        gateway_cors_origins=("https://shop.example",),
    )
    proc = start_gateway(settings, tmp_path)
    try:
        allowed = preflight(f"http://{settings.gateway_addr}", "https://shop.example")
        assert allowed["access-control-allow-origin"] == "https://shop.example"
        assert "authorization" in allowed["access-control-allow-headers"].lower()
        assert "access-control-allow-origin" not in preflight(f"http://{settings.gateway_addr}", "https://evil.example")
    finally:
        proc.stop()


def test_health_and_console_are_served(gateway: Gateway) -> None:
    with urllib.request.urlopen(gateway.url + "/api/health", timeout=10) as response:
        assert json.load(response) == {"command": "SERVING", "query": "SERVING", "admin": "SERVING"}
    with urllib.request.urlopen(gateway.url + "/", timeout=10) as response:
        page = response.read().decode()
    assert "<title>orders console</title>" in page
    eventually(lambda: urllib.request.urlopen(gateway.url + "/console.js", timeout=10).status == 200, timeout=10)
    # `orders health URL`, the gateway container's probe: 0 while it answers, 1 where nothing listens.
    for url, code in ((gateway.url + "/api/health", 0), (f"http://127.0.0.1:{local_stack.free_port()}/api/health", 1)):
        probe = subprocess.run(
            [sys.executable, "-m", "orders.cli", "health", url], capture_output=True, text=True, timeout=60
        )
        assert (probe.returncode, probe.stdout.strip()) == (code, f"{url}: {'OK' if code == 0 else 'no answer'}")
