"""The gateway's translation of gRPC errors into Connect errors: every code, message and details."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from orders.gateway.forwarding import connect_error, method_attribute


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK], ids=lambda c: c.name)
def test_every_grpc_code_keeps_its_meaning(code: grpc.StatusCode) -> None:
    error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="why")
    translated = connect_error(error)
    assert translated.code.name.replace("CANCELED", "CANCELLED") == code.name
    assert translated.message == "why"


def test_details_arrive_as_they_were_sent() -> None:
    violation = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field="lines", description="required")]
    )
    packed = any_pb2.Any()
    packed.Pack(violation)
    status = status_pb2.Status(code=3, message="invalid request: lines", details=[packed])
    trailers = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), trailers, details=status.message
    )
    (detail,) = connect_error(error).details
    assert detail.type_name == "google.rpc.BadRequest"
    assert error_details_pb2.BadRequest.FromString(detail.message_bytes) == violation


def test_method_attributes_are_the_generated_code_names() -> None:
    from orders.v1.queries_connect import QueryService

    assert method_attribute("WatchOrderSummaries") == "watch_order_summaries"
    assert hasattr(QueryService, method_attribute("GetOrderSummary"))
