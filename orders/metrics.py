"""Prometheus metrics over HTTP: each process serves the default registry on its own port.

Every process exports the gRPC metrics below; each service module defines its own next to the code that
moves them. prometheus_client adds process_* (CPU, resident memory, open files) and python_* metrics.
"""

from __future__ import annotations

import functools

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

RPCS = Counter(
    "orders_rpc_requests", "gRPC calls handled, by service, method and status code", ["service", "method", "code"]
)
RPC_SECONDS = Histogram(
    "orders_rpc_duration_seconds",
    "Time from a gRPC call's start to its status (streams: until the last message), by service and method",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


@functools.cache
def _projection_lag_gauges() -> tuple[Gauge, Gauge]:
    return (
        Gauge("orders_projection_lag_events", "Events in the stream not yet applied to the read model"),
        Gauge("orders_projection_lag_seconds", "Age of the oldest event not yet applied"),
    )


def set_projection_lag(events: float, seconds: float) -> None:
    """Export the projection lag: the projector's measurement, or (query service) its last report.

    The gauges are registered on first use, so only the processes that know the lag export them.
    """
    events_gauge, seconds_gauge = _projection_lag_gauges()
    events_gauge.set(events)
    seconds_gauge.set(seconds)


def serve_metrics(address: str) -> int:
    """Serve the registry as Prometheus text at http://address/metrics (a daemon thread); return the port."""
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), host, REGISTRY)
    return int(server.server_port)
