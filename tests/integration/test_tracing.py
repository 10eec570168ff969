"""With an OTLP endpoint configured, a command and its projection are spans of the caller's trace."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from orders import local_stack
from orders.v1 import commands_pb2, commands_pb2_grpc
from tests.support import Infra, add_product, eventually, isolated_settings, migrate, new_sku, start_serving

trace_service_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")


class Collector:
    """A minimal OTLP/HTTP trace receiver: keeps (service name, trace id, span id, parent id, name, kind)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, str, str, int]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    attributes = {a.key: a.value.string_value for a in resource.resource.attributes}
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            collector.spans.append(
                                (
                                    attributes.get("service.name", ""),
                                    span.trace_id.hex(),
                                    span.span_id.hex(),
                                    span.parent_span_id.hex(),
                                    span.name,
                                    span.kind,
                                )
                            )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    running = Collector()
    yield running
    running.close()


def test_a_command_and_its_projection_are_exported_as_spans_of_the_callers_trace(
    infra: Infra, own_nats: local_stack.LocalNats, collector: Collector, tmp_path: Path
) -> None:
    settings = isolated_settings(infra, nats_url=own_nats.url)
    asyncio.run(migrate(settings))
    tracing_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    processes = []
    try:
        for module in ("command_service", "projector"):
            processes.append(start_serving(module, settings, tmp_path / module, extra_env=tracing_env))
        with grpc.insecure_channel(settings.command_addr) as channel:
            stub = commands_pb2_grpc.CommandServiceStub(channel)
            sku = new_sku("O")
            add_product(stub, sku, stock=3)
            trace_id, caller_span = uuid.uuid4().hex, "b7ad6b7169203331"
            reply = stub.PlaceOrder(
                commands_pb2.PlaceOrderRequest(
                    request_id=str(uuid.uuid4()),
                    customer_id="traced",
                    lines=[commands_pb2.PlaceOrderLine(sku=sku, quantity=1)],
                ),
                metadata=(("traceparent", f"00-{trace_id}-{caller_span}-01"),),
                timeout=10,
            )

        def trace_spans() -> list[tuple[str, str, str, str, str, int]]:
            spans = [s for s in collector.spans if s[1] == trace_id]
            return spans if {s[0] for s in spans} == {"orders-command", "orders-projector"} else []

        spans = eventually(trace_spans, 15, "spans of both services")
        (server,) = [s for s in spans if s[0] == "orders-command"]
        assert (server[3], server[4]) == (caller_span, "orders.v1.CommandService/PlaceOrder")
        applied = [s for s in spans if s[0] == "orders-projector"]
        # The order's event and the stock change of its product, each a child of the command's span.
        assert {s[4] for s in applied} == {f"apply order/{reply.order_id} v1", f"apply product/{sku} v3"}
        assert all(s[3] == server[2] for s in applied)
    finally:
        for proc in processes:
            proc.stop()
