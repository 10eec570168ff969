"""The gateway's ASGI application: the three services' Connect applications (each under its service path,
/orders.v1.CommandService/PlaceOrder and so on), GET /api/health, and the console's static files at /;
CORS only for the configured origins."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from orders.gateway.forwarding import forwarder
from orders.v1 import admin_pb2, commands_pb2, queries_pb2
from orders.v1.admin_connect import AdminServiceASGIApplication
from orders.v1.commands_connect import CommandServiceASGIApplication
from orders.v1.queries_connect import QueryServiceASGIApplication

MAX_REQUEST_BYTES = 1 << 20  # as the gRPC servers: larger requests get RESOURCE_EXHAUSTED
HEALTH_TIMEOUT = 2.0
# Headers a browser may send and read across origins: Connect's and gRPC-Web's own, the bearer token,
# the correlation id and trace context.
CORS_REQUEST_HEADERS = [
    "Content-Type", "Connect-Protocol-Version", "Connect-Timeout-Ms", "Connect-Accept-Encoding",
    "Connect-Content-Encoding", "Grpc-Timeout", "X-Grpc-Web", "X-User-Agent", "Authorization",
    "X-Correlation-Id", "Traceparent",
]  # fmt: skip
CORS_RESPONSE_HEADERS = ["Grpc-Status", "Grpc-Message", "Grpc-Status-Details-Bin", "X-Correlation-Id"]

# upstream name -> (service descriptor, generated Connect application)
SERVICES: dict[str, tuple[Any, Any]] = {
    "command": (commands_pb2.DESCRIPTOR.services_by_name["CommandService"], CommandServiceASGIApplication),
    "query": (queries_pb2.DESCRIPTOR.services_by_name["QueryService"], QueryServiceASGIApplication),
    "admin": (admin_pb2.DESCRIPTOR.services_by_name["AdminService"], AdminServiceASGIApplication),
}


def create_app(channels: Mapping[str, grpc.aio.Channel], cors_origins: tuple[str, ...] = ()) -> ASGIApp:
    """channels: a gRPC channel per upstream name of SERVICES."""
    by_path = {}
    for name, (service, application) in SERVICES.items():
        by_path[f"/{service.full_name}/"] = application(
            forwarder(service, channels[name]), read_max_bytes=MAX_REQUEST_BYTES
        )
    console = StaticFiles(directory=str(resources.files("orders.gateway") / "console"), html=True)

    async def health(scope: Scope, receive: Receive, send: Send) -> None:
        report = {name: await _status(channel) for name, channel in channels.items()}
        await JSONResponse(report, headers={"cache-control": "no-store"})(scope, receive, send)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        for prefix, target in by_path.items():
            if path.startswith(prefix):
                return await target(scope, receive, send)
        if path == "/api/health":
            return await health(scope, receive, send)
        return await console(scope, receive, send)

    if not cors_origins:
        return app
    return CORSMiddleware(
        app,
        allow_origins=list(cors_origins),
        allow_methods=["GET", "POST"],
        allow_headers=CORS_REQUEST_HEADERS,
        expose_headers=CORS_RESPONSE_HEADERS,
        max_age=7200,
    )


async def _status(channel: grpc.aio.Channel) -> str:
    """The upstream server's own health (SERVING, NOT_SERVING, ...) or why it did not answer."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        return f"no answer ({error.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
