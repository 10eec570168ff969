"""Prometheus metrics over HTTP: one registry and one port per process, built by its composition root."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


def serve_metrics(address: str, registry: CollectorRegistry) -> int:
    """Serve registry as Prometheus text at http://address/metrics (a daemon thread); return the port."""
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), host, registry)
    return int(server.server_port)
