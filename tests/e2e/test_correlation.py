"""One command's correlation id and trace travel from the gRPC call through the outbox and NATS to the projector."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from orders.v1 import commands_pb2
from tests.support import Stack, add_product, bad_fields, eventually, new_id, new_sku


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The log's JSON lines (every line a service writes is one JSON object)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def lines_with(path: Path, correlation_id: str) -> list[dict[str, Any]]:
    return [entry for entry in json_lines(path) if entry.get("correlation_id") == correlation_id]


def test_the_correlation_id_and_trace_reach_the_projector_logs(stack: Stack) -> None:
    sku = new_sku("C")
    add_product(stack.commands, sku, stock=5)
    correlation_id, trace_id = f"checkout-{uuid.uuid4()}", uuid.uuid4().hex
    request = commands_pb2.PlaceOrderRequest(
        request_id=new_id(), customer_id="traced", lines=[commands_pb2.PlaceOrderLine(sku=sku, quantity=1)]
    )
    reply, call = stack.commands.PlaceOrder.with_call(
        request,
        metadata=(("x-correlation-id", correlation_id), ("traceparent", f"00-{trace_id}-{'ab' * 8}-01")),
        timeout=10,
    )
    assert ("x-correlation-id", correlation_id) in call.trailing_metadata()

    command_lines = eventually(
        lambda: lines_with(stack.log_dir / "command_service.log", correlation_id), 10, "the command's log line"
    )
    assert any("PlaceOrder OK" in entry["message"] and entry["level"] == "INFO" for entry in command_lines)
    assert all(entry["traceparent"].split("-")[1] == trace_id for entry in command_lines)
    # The projector, at the default log level, names the correlation id on the line of the batch that applied it.
    projector_lines = eventually(
        lambda: [
            entry
            for entry in json_lines(stack.log_dir / "projector.log")
            if correlation_id in entry.get("correlation_ids", []) and correlation_id in entry["message"]
        ],
        10,
        "the projector's line for the applied batch",
    )
    assert all(entry["level"] == "INFO" and "applied" in entry["message"] for entry in projector_lines)
    assert stack.settings.log_level == "INFO"
    # Each process works in a span of its own within the caller's trace.
    assert all(entry["traceparent"].split("-")[2] != "ab" * 8 for entry in command_lines)


def test_an_id_is_generated_when_absent_and_returned_with_errors_too(stack: Stack) -> None:
    _reply, call = stack.commands.UpsertProduct.with_call(
        commands_pb2.UpsertProductRequest(
            request_id=new_id(), sku=new_sku("C"), name="generated id", unit_price={"currency_code": "EUR"}
        ),
        timeout=10,
    )
    generated = dict(call.trailing_metadata())["x-correlation-id"]
    assert str(uuid.UUID(generated)) == generated

    with pytest.raises(grpc.RpcError) as refused:
        stack.commands.PlaceOrder(
            commands_pb2.PlaceOrderRequest(request_id=new_id()),
            metadata=(("x-correlation-id", "bad-order-42"),),
            timeout=10,
        )
    assert ("x-correlation-id", "bad-order-42") in refused.value.trailing_metadata()
    assert bad_fields(refused.value) == {"customer_id", "lines"}  # the error details survive alongside
    rejected = eventually(
        lambda: lines_with(stack.log_dir / "command_service.log", "bad-order-42"), 10, "the refusal's log line"
    )
    assert any("INVALID_ARGUMENT" in entry["message"] for entry in rejected)
