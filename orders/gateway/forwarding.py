"""Connect service implementations made from the protos' service descriptors: every method forwards its
request to the gRPC server of that service and returns (or streams) the answer, so no route or method
is written by hand.

What passes through, both ways:
- request headers `authorization`, `x-correlation-id` and `traceparent` become gRPC metadata; the
  caller's Connect timeout becomes the call's deadline;
- the gRPC server's `x-correlation-id` comes back as a response header;
- a gRPC error becomes the Connect error of the same code, message and details (BadRequest,
  PreconditionFailure, ... from `grpc-status-details-bin`), so an HTTP client sees what a gRPC one would;
  a server that cannot be reached is UNAVAILABLE, never INTERNAL.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.request import RequestContext
from google.protobuf import descriptor, message_factory
from google.rpc import status_pb2
from protobuf.wkt import Any as WireAny

PASSED_HEADERS = ("authorization", "x-correlation-id", "traceparent")
RETURNED_METADATA = ("x-correlation-id",)
DETAILS_KEY = "grpc-status-details-bin"
CONNECT_SPELLING = {"CANCELLED": "CANCELED"}  # the one code Connect names differently from gRPC


def method_attribute(name: str) -> str:
    """The attribute the generated Connect code calls for an RPC: PlaceOrder -> place_order."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def connect_error(error: grpc.aio.AioRpcError) -> ConnectError:
    """The Connect error that says what the gRPC error says, details included."""
    name = CONNECT_SPELLING.get(error.code().name, error.code().name)
    code = Code[name] if name in Code.__members__ else Code.UNKNOWN
    details = []
    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            details = [ErrorDetail(WireAny(type_url=d.type_url, value=d.value)) for d in status.details]
    return ConnectError(code, error.details() or "", details)


class _Passing:
    """The metadata and deadline of one forwarded call, and the server's correlation id on the way back."""

    def __init__(self, ctx: RequestContext[Any, Any]) -> None:
        self._ctx = ctx
        headers = ctx.request_headers
        self.metadata = tuple((key, headers[key]) for key in PASSED_HEADERS if key in headers)
        timeout_ms = ctx.timeout_ms
        self.timeout = timeout_ms / 1000 if timeout_ms else None

    async def returned(self, call: Any, *, streaming: bool) -> None:
        """The gRPC server sends its correlation id as trailing metadata: a unary answer carries it as a
        response header, a stream in its end message's metadata (Connect's trailers)."""
        target = self._ctx.response_trailers if streaming else self._ctx.response_headers
        for key, value in await call.trailing_metadata() or ():
            if key in RETURNED_METADATA:
                target[key] = value


def _unary(channel: grpc.aio.Channel, path: str, output: type[Any]) -> Callable[..., Any]:
    call_method = channel.unary_unary(path, request_serializer=_serialize, response_deserializer=output.FromString)

    async def forward(request: Any, ctx: RequestContext[Any, Any]) -> Any:
        passing = _Passing(ctx)
        call = call_method(request, metadata=passing.metadata, timeout=passing.timeout)
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise connect_error(error) from None
        finally:
            await passing.returned(call, streaming=False)

    return forward


def _server_stream(channel: grpc.aio.Channel, path: str, output: type[Any]) -> Callable[..., Any]:
    call_method = channel.unary_stream(path, request_serializer=_serialize, response_deserializer=output.FromString)

    async def forward(request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        passing = _Passing(ctx)
        call = call_method(request, metadata=passing.metadata, timeout=passing.timeout)
        try:
            async for response in call:
                yield response
            await passing.returned(call, streaming=True)
        except grpc.aio.AioRpcError as error:
            await passing.returned(call, streaming=True)
            raise connect_error(error) from None
        finally:
            call.cancel()  # the HTTP client went away: stop the gRPC stream too

    return forward


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def forwarder(service: descriptor.ServiceDescriptor, channel: grpc.aio.Channel) -> Any:
    """An object with one forwarding coroutine per RPC of service, named as the generated code expects."""
    implementation = type(f"{service.name}Forwarder", (), {})()
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client streaming is not forwarded")
        make = _server_stream if method.server_streaming else _unary
        output = message_factory.GetMessageClass(method.output_type)
        setattr(
            implementation, method_attribute(method.name), make(channel, f"/{service.full_name}/{method.name}", output)
        )
    return implementation
