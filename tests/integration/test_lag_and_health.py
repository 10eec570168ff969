"""Lag reporting (CLI and AdminService) and the health statuses that follow it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orders import local_stack
from orders.config import Settings
from tests.support import (
    Infra,
    eventually,
    isolated_settings,
    migrate,
    product_event,
    publish_events,
    scrape_metrics,
    start_serving,
)


def lag(settings: Settings) -> dict:  # type: ignore[type-arg]
    result = subprocess.run(
        [sys.executable, "-m", "orders.cli", "lag", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **settings.to_env()},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def metrics(settings: Settings) -> dict[str, float]:
    return scrape_metrics(settings.query_metrics_addr)


def projection_serving(settings: Settings) -> bool:
    with grpc.insecure_channel(settings.query_addr) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="projection"), timeout=5
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def test_lag_is_reported_and_turns_the_projection_health_red(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    settings = isolated_settings(
        infra, nats_url=own_nats.url, lag_alert_events=5, lag_alert_seconds=3.0, retry_backoff=(0.5,), max_deliver=1000
    )
    asyncio.run(migrate(settings))
    asyncio.run(publish_events(settings, [product_event(f"A-{i}", 1, 1) for i in range(3)]))  # type: ignore[misc]
    procs: dict[str, local_stack.ManagedProcess] = {}
    try:
        for module in ("projector", "query_service"):
            procs[module] = start_serving(module, settings, tmp_path)
        caught_up = eventually(lambda: (g := lag(settings))["stream_last_sequence"] == "3" and g, 10, "lag measured")
        assert caught_up.get("lag_events", "0") == "0"
        eventually(lambda: projection_serving(settings), 10, "projection SERVING")

        stuck = f"S-{uuid.uuid4().hex[:6]}"
        # v3 without v2 holds the ack floor; ten later events pile up behind it.
        events = [product_event(stuck, 1, 1), product_event(stuck, 3, 3)] + [
            product_event(f"B-{i}-{stuck}", 1, 1) for i in range(10)
        ]
        asyncio.run(publish_events(settings, events))  # type: ignore[arg-type]
        behind = eventually(lambda: int((g := lag(settings)).get("lag_events", 0)) >= 10 and g, 15, "lag grows")
        assert float(behind["lag_seconds"]) > 0
        eventually(lambda: not projection_serving(settings), 15, "projection reported as lagging")
        scraped = eventually(
            lambda: (m := metrics(settings))["orders_projection_lag_events"] >= 10 and m, 10, "lag in the metrics"
        )
        assert scraped["orders_projection_lagging"] == 1.0 and scraped["orders_projection_lag_seconds"] > 0

        asyncio.run(publish_events(settings, [product_event(stuck, 2, 2)]))  # type: ignore[list-item]
        eventually(lambda: lag(settings).get("lag_events", "0") == "0", 15, "lag back to zero")
        eventually(lambda: projection_serving(settings), 15, "projection SERVING again")
        assert (
            eventually(
                lambda: (m := metrics(settings))["orders_projection_lagging"] == 0.0 and m, 10, "metrics back to normal"
            )["orders_projection_lag_events"]
            == 0
        )

        procs["projector"].stop()  # no more reports: stale within lag_alert_seconds
        eventually(lambda: not projection_serving(settings), 15, "silent projector reported as lagging")
    finally:
        for proc in procs.values():
            proc.stop()
