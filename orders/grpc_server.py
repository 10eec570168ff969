"""gRPC server plumbing shared by both services: server creation, health, reflection, error mapping."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from orders import correlation, metrics, reflection, security, tracing, workers
from orders.config import Settings
from orders.db import is_unavailable
from orders.errors import DomainError, FieldViolation, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

CORRELATION_HEADER = "x-correlation-id"
TRACEPARENT_HEADER = "traceparent"
MAX_REQUEST_BYTES = 1024 * 1024  # the largest valid request (an order of 100 lines) is far smaller
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_STREAMS_PER_CONNECTION = 256
# Clients may send keepalive pings of their own this often at most (gRPC's server default is 5 minutes,
# stricter than most client keepalive settings: a client pinging faster is sent GOAWAY too_many_pings).
CLIENT_PING_MIN_INTERVAL_MS = 10_000

F = TypeVar("F", bound=Callable[..., Any])


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key and isinstance(value, str):
            return value
    return None


class MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the handler can answer INVALID_ARGUMENT.

    (gRPC's own handling of a deserialization failure answers INTERNAL, which would blame the server.)
    """

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name = type_name
        self.error = error

    def to_error(self) -> InvalidArgument:
        return InvalidArgument([FieldViolation("request", f"not a valid {self.type_name}: {self.error}")])


def _tolerant_deserializer(message_class: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as exc:  # DecodeError, but also RuntimeWarning-style errors on odd input
            return MalformedRequest(message_class.DESCRIPTOR.full_name, str(exc) or type(exc).__name__)

    return deserialize


def add_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer: Any, max_call_seconds: float) -> None:
    """Register servicer's methods for service, with deserializers that never fail the call; unary
    methods wrapped by `rpc` end after max_call_seconds at the latest."""
    handlers = {}
    for method in service.methods:
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        behaviour = getattr(servicer, method.name)
        if getattr(behaviour, "takes_call_limit", False):
            behaviour = functools.partial(behaviour, max_call_seconds=max_call_seconds)
        handlers[method.name] = make(
            behaviour,
            request_deserializer=_tolerant_deserializer(message_factory.GetMessageClass(method.input_type)),
            response_serializer=lambda message: message.SerializeToString(),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _status_for(exc: Exception) -> grpc.Status | None:
    if isinstance(exc, DomainError):
        return exc.to_status()
    if is_unavailable(exc):
        return Unavailable("database unavailable, retry later").to_status()
    return None


class _Call:
    """One call's bookkeeping: its correlation context, its metrics and its access log line."""

    def __init__(
        self, service: str, method: str, access_log: int, context: grpc.aio.ServicerContext, traceparent: str
    ) -> None:
        self.service, self.method, self.access_log, self.context = service, method, access_log, context
        self.started = time.perf_counter()
        self.correlation_id = correlation.correlation_id_from(_metadata(context, CORRELATION_HEADER))
        # Each call runs in a task of its own, so these stay with this call and end with its task.
        correlation.CORRELATION_ID.set(self.correlation_id)
        correlation.TRACEPARENT.set(traceparent)
        context.set_trailing_metadata(((CORRELATION_HEADER, self.correlation_id),))

    def finish(self, code: grpc.StatusCode) -> None:
        elapsed = time.perf_counter() - self.started
        metrics.RPCS.labels(self.service, self.method, code.name).inc()
        metrics.RPC_SECONDS.labels(self.service, self.method).observe(elapsed)
        log.log(self.access_log, "%s.%s %s in %.1f ms", self.service, self.method, code.name, elapsed * 1000)

    async def fail(self, exc: Exception) -> None:
        """End the call with the status exc stands for (INTERNAL, logged with its trace, when unknown)."""
        status = _status_for(exc)
        if status is None:
            log.exception("unexpected error in %s.%s", self.service, self.method)
            self.finish(grpc.StatusCode.INTERNAL)
            await self.context.abort(grpc.StatusCode.INTERNAL, "internal error")
            return
        if isinstance(exc, Unavailable) or not isinstance(exc, DomainError):
            log.warning("%s.%s unavailable: %s", self.service, self.method, exc)
        self.finish(status.code)
        await self.context.abort(
            status.code, status.details, ((CORRELATION_HEADER, self.correlation_id), *status.trailing_metadata)
        )


@overload
def rpc(method: F, *, access_log: int = ..., streams: bool = ...) -> F: ...
@overload
def rpc(*, access_log: int = ..., streams: bool = ...) -> Callable[[F], F]: ...


def rpc(method: F | None = None, *, access_log: int = logging.DEBUG, streams: bool = False) -> Any:
    """Wrap a servicer method: correlation context, metrics, access log, and errors mapped to statuses.

    DomainError → its code with google.rpc details; an unreachable database → UNAVAILABLE; anything
    else → INTERNAL with a generic message (the stack trace goes to the log, never to the client).
    Every answer carries the call's x-correlation-id in its trailing metadata. Works for unary methods
    and for server-streaming async generators; access_log is the level of the per-call log line.
    Unary calls end after max_call_seconds (given by `add_servicer`) at the latest; streams (async
    generators, or coroutines that write with context.write, marked streams=True) last as long as the
    client wants.
    """
    if method is None:
        return functools.partial(rpc, access_log=access_log, streams=streams)
    service, _, name = method.__qualname__.rpartition(".")
    span_name = f"orders.v1.{service}/{name}"

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            with tracing.span(span_name, _metadata(context, TRACEPARENT_HEADER)) as traceparent:
                call = _Call(service, name, access_log, context, traceparent)
                try:
                    if isinstance(request, MalformedRequest):
                        raise request.to_error()
                    async for item in method(self, request, context):
                        yield item
                    call.finish(grpc.StatusCode.OK)
                except grpc.aio.AbortError:
                    raise
                except (asyncio.CancelledError, GeneratorExit):
                    call.finish(grpc.StatusCode.CANCELLED)
                    raise
                except Exception as exc:
                    await call.fail(exc)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext, max_call_seconds: float | None = None
    ) -> Any:
        with tracing.span(span_name, _metadata(context, TRACEPARENT_HEADER)) as traceparent:
            call = _Call(service, name, access_log, context, traceparent)
            try:
                if isinstance(request, MalformedRequest):
                    raise request.to_error()
                async with asyncio.timeout(None if streams else max_call_seconds):
                    result = await method(self, request, context)
                call.finish(grpc.StatusCode.OK)
                return result
            except grpc.aio.AbortError:
                raise
            except TimeoutError:
                call.finish(grpc.StatusCode.DEADLINE_EXCEEDED)
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the call took longer than the server's limit of {max_call_seconds or 0:g}s",
                    ((CORRELATION_HEADER, call.correlation_id),),
                )
            except asyncio.CancelledError:
                call.finish(grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:
                await call.fail(exc)

    unary_wrapper.takes_call_limit = True  # type: ignore[attr-defined]
    return unary_wrapper


class HealthServicer(health.aio.HealthServicer):
    """grpcio-health-checking's servicer (Check, Watch), plus List: every status set on it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self._listed: dict[str, health_pb2.HealthCheckResponse.ServingStatus.ValueType] = {
            "": health_pb2.HealthCheckResponse.SERVING
        }

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        await super().set(service, status)
        self._listed[service] = status

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in self._listed.items()}
        )


def keepalive_options(settings: Settings) -> list[tuple[str, int]]:
    """HTTP/2 keepalive of a server: ping every client connection every keepalive_time seconds (also while
    a stream is open but idle, such as a quiet watch), and drop a connection whose client does not answer
    within keepalive_timeout; accept clients' own pings every CLIENT_PING_MIN_INTERVAL_MS or slower.

    gRPC core waits for a ping's ack for grpc.http2.ping_timeout_ms (an argument of its own, one minute
    by default) rather than keepalive_timeout_ms, so both are set; a test freezes a client to check it.
    """
    timeout_ms = int(settings.keepalive_timeout * 1000)
    return [
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PING_MIN_INTERVAL_MS),
    ]


def create_server(
    address: str, service: ServiceDescriptor, servicer: Any, settings: Settings
) -> tuple[grpc.aio.Server, int, HealthServicer]:
    """A grpc.aio server on address serving servicer, plus health and reflection; returns the bound port.

    TLS, mTLS and bearer-token checks as settings configure them. Bind to port 0 to get a free port.
    """
    tokens = security.load_tokens(settings)
    server = grpc.aio.server(
        interceptors=[security.AuthInterceptor(tokens, settings.auth_open_health)] if tokens is not None else [],
        options=[
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            # Workers of one service share its port; a lone process must fail on a port already taken.
            ("grpc.so_reuseport", 0 if workers.worker_index() is None else 1),
            *keepalive_options(settings),
        ],
    )
    add_servicer(server, service, servicer, settings.max_call_seconds)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable(server, [service.full_name, health.SERVICE_NAME])
    credentials = security.server_credentials(settings)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpc's message for a failed bind names no cause
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address}: the address is in use or not local (set another in ORDERS_*_ADDR)")
    return server, port, health_servicer


async def set_serving(
    health_servicer: HealthServicer, names: Iterable[str], serving: bool, *, overall: bool = True
) -> None:
    """Mark each named service (and, with overall, the server as a whole: '') SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *names) if overall else names:
        await health_servicer.set(name, status)
