"""JetStream's file store full (max_file_store reached) under load, then raised by a configuration reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from orders import local_stack
from orders.config import Settings
from orders.v1 import queries_pb2, queries_pb2_grpc
from tests.fault import harness
from tests.support import Infra, eventually, isolated_settings


def lag(settings: Settings) -> dict[str, Any]:
    """`orders lag --json`, the real CLI."""
    done = subprocess.run(
        [sys.executable, "-m", "orders.cli", "lag", "--json"],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_a_full_jetstream_shows_as_lag_and_drains_once_space_is_freed(infra: Infra, tmp_path: Path) -> None:
    """With the store full, every publish fails (insufficient resources) and the outbox grows: the relay
    health, `orders lag` (unpublished events in the lag), the query side's `projection` health and a
    token read all say so. Raising max_file_store by a reload lets the backlog drain by itself."""
    started = time.monotonic()
    nats = local_stack.start_nats(tmp_path / "nats", jetstream_config="  max_file_store: 1MB\n")
    settings = isolated_settings(infra, nats_url=nats.url, lag_alert_events=200)
    with harness.loaded_system(settings, tmp_path, "j", adopt={"nats": nats}) as (system, client, load):
        system.start("query", "query_service")
        with load.running():
            eventually(lambda: harness.outbox_backlog(settings) > 500, 60, "the store full, the outbox growing")
            fault_start = time.monotonic()
            eventually(lambda: harness.health(settings.command_addr, "relay") == "NOT_SERVING", 15, "relay health")
            eventually(lambda: harness.health(settings.query_addr, "projection") == "NOT_SERVING", 15, "projection")
            during = eventually(
                lambda: (found := lag(settings)) and int(found["unpublished_events"]) > 500 and found, 15
            )
            probe = client.place("full-probe", [(system.skus[0], 1)])
            assert probe.ok  # commands keep succeeding: their events wait in the outbox
            read = queries_pb2.GetOrderSummaryRequest(
                order_id=probe.order_id, consistency_token=probe.consistency_token
            )
            with grpc.insecure_channel(settings.query_addr) as channel, pytest.raises(grpc.RpcError) as waited:
                queries_pb2_grpc.QueryServiceStub(channel).GetOrderSummary(read, timeout=3)
            nats.reload("  max_file_store: 1GB\n")
            fault_end = time.monotonic()
            caught_up = harness.caught_up_after(settings, fault_end, timeout=120)
            harness.wait_for_commands(load, 100)
        harness.finish("JetStream store full", system, client, caught_up, started)

    assert waited.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not yet published from the command side's outbox" in (waited.value.details() or ""), waited.value
    assert int(during["lag_events"]) >= int(during["unpublished_events"]) > 500
    assert float(during["oldest_unpublished_seconds"]) > 0
    print(f"store full for {fault_end - fault_start:.1f} s; caught up {caught_up:.1f} s after the reload")
