"""Lag reporting (CLI and AdminService) and the health statuses that follow it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orders import local_stack
from orders.config import Settings
from orders.events import PRODUCT, EventContext, build_event
from orders.v1 import common_pb2, events_pb2
from tests.support import Infra, eventually, isolated_settings, migrate, publish_events, serving_or_raise

pytestmark = pytest.mark.e2e


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


def projection_serving(settings: Settings) -> bool:
    with grpc.insecure_channel(settings.query_addr) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="projection"), timeout=5
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def product(sku: str, version: int) -> object:
    meta = EventContext(occurred_at=datetime.now(UTC), correlation_id="t", causation_id="t")
    if version == 1:
        return build_event(
            meta,
            PRODUCT,
            sku,
            1,
            product_upserted=events_pb2.ProductUpserted(
                name=sku, unit_price=common_pb2.Money(currency_code="EUR", minor_units=1), stock=1
            ),
        )
    return build_event(
        meta, PRODUCT, sku, version, inventory_adjusted=events_pb2.InventoryAdjusted(delta=1, stock=version)
    )


def test_lag_is_reported_and_turns_the_projection_health_red(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    settings = isolated_settings(
        infra, nats_url=own_nats.url, lag_alert_events=5, lag_alert_seconds=3.0, retry_backoff=(0.5,), max_deliver=1000
    )
    asyncio.run(migrate(settings))
    asyncio.run(publish_events(settings, [product(f"A-{i}", 1) for i in range(3)]))  # type: ignore[misc]
    procs = {m: local_stack.start_service(m, settings.to_env(), tmp_path) for m in ("projector", "query_service")}
    try:
        for address in (settings.admin_addr, settings.query_addr):
            local_stack.wait_until(lambda a=address: serving_or_raise(a, procs), 30, f"{address} SERVING")
        caught_up = eventually(lambda: (g := lag(settings))["stream_last_sequence"] == "3" and g, 10, "lag measured")
        assert caught_up.get("lag_events", "0") == "0"
        eventually(lambda: projection_serving(settings), 10, "projection SERVING")

        stuck = f"S-{uuid.uuid4().hex[:6]}"
        # v3 without v2 holds the ack floor; ten later events pile up behind it.
        events = [product(stuck, 1), product(stuck, 3)] + [product(f"B-{i}-{stuck}", 1) for i in range(10)]
        asyncio.run(publish_events(settings, events))  # type: ignore[arg-type]
        behind = eventually(lambda: int((g := lag(settings)).get("lag_events", 0)) >= 10 and g, 15, "lag grows")
        assert float(behind["lag_seconds"]) > 0
        eventually(lambda: not projection_serving(settings), 15, "projection reported as lagging")

        asyncio.run(publish_events(settings, [product(stuck, 2)]))  # type: ignore[list-item]
        eventually(lambda: lag(settings).get("lag_events", "0") == "0", 15, "lag back to zero")
        eventually(lambda: projection_serving(settings), 15, "projection SERVING again")

        procs["projector"].stop()  # no more reports: stale within lag_alert_seconds
        eventually(lambda: not projection_serving(settings), 15, "silent projector reported as lagging")
    finally:
        for proc in procs.values():
            proc.stop()
