"""Rebuild: the whole stream replayed into fresh tables and swapped in while queries keep being answered."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import pytest

from orders import cli, local_stack
from orders.v1 import queries_pb2, queries_pb2_grpc
from tests.support import (
    Infra,
    eventually,
    isolated_settings,
    migrate,
    projects,
    publish_events,
    read_rows,
    start_serving,
    synthetic_history,
)


def test_rebuild_of_20000_events_without_query_downtime(
    infra: Infra,
    own_nats: local_stack.LocalNats,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = isolated_settings(infra, nats_url=own_nats.url)
    asyncio.run(migrate(settings))
    history = synthetic_history(20_000, 2_000, 50, seed=3, prefix=f"R{uuid.uuid4().hex[:6]}")
    later = synthetic_history(300, 30, 5, seed=4, prefix=f"L{uuid.uuid4().hex[:6]}")
    asyncio.run(publish_events(settings, history.events))
    procs: dict[str, local_stack.ManagedProcess] = {}
    channel = grpc.insecure_channel(settings.query_addr)
    try:
        for module in ("projector", "query_service"):
            procs[module] = start_serving(module, settings, tmp_path)
        eventually(lambda: projects(settings, history), 120, "incremental projection of 20,000 events")
        incremental = read_rows(settings)

        stub = queries_pb2_grpc.QueryServiceStub(channel)
        order_ids = sorted(history.orders)
        stop = threading.Event()
        outcomes = {"ok": 0, "failed": 0}
        errors: list[str] = []

        def query_continuously() -> None:
            rng = random.Random(1)
            while not stop.is_set():
                try:
                    reply = stub.GetOrderSummary(
                        queries_pb2.GetOrderSummaryRequest(order_id=rng.choice(order_ids)), timeout=10
                    )
                    assert reply.summary.version >= 1
                    stub.ListProducts(queries_pb2.ListProductsRequest(page_size=20), timeout=10)
                    outcomes["ok"] += 1
                except grpc.RpcError as err:
                    outcomes["failed"] += 1
                    errors.append(f"{err.code()}: {err.details()}")

        querier = threading.Thread(target=query_continuously)
        querier.start()
        rebuild = subprocess.Popen(
            [sys.executable, "-m", "orders.cli", "rebuild", "--json"],
            env={**os.environ, **settings.to_env()},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert rebuild.stdout is not None
            first = json.loads(rebuild.stdout.readline())  # the rebuild is under way
            # The CLI's second attempt runs in this process: a new interpreter could take longer to
            # start on a busy machine than the first rebuild takes to finish.
            for name, value in settings.to_env().items():
                monkeypatch.setenv(name, value)
            capsys.readouterr()
            with pytest.raises(SystemExit) as second:
                cli.main(["rebuild"])
            refusal = capsys.readouterr().err
            assert second.value.code == 1 and "FAILED_PRECONDITION" in refusal, refusal  # one rebuild at a time
            asyncio.run(publish_events(settings, later.events))  # new events while it runs
            progress = [first] + [json.loads(line) for line in rebuild.stdout]
            assert rebuild.wait(120) == 0, rebuild.stderr.read() if rebuild.stderr else ""
        finally:
            local_stack.stop_process(rebuild)  # type: ignore[arg-type]
            stop.set()
            querier.join(30)
        assert progress[-1]["swapped"] is True
        assert int(progress[-1]["replayed"]) >= 20_000 and int(progress[-1]["target_sequence"]) >= 20_000
        assert outcomes["failed"] == 0, errors[:5]
        assert outcomes["ok"] > 0

        eventually(lambda: projects(settings, later, exactly=False), 60, "events published during the rebuild")
        assert projects(settings, history, exactly=False)
        rebuilt = read_rows(settings)
        keys = {"orders": set(history.orders), "products": set(history.products)}
        for table in ("orders", "products"):
            assert [r for r in rebuilt[table] if r[0] in keys[table]] == incremental[table]
        assert len(rebuilt["orders"]) == len(history.orders) + len(later.orders)
    finally:
        channel.close()
        for proc in procs.values():
            proc.stop()
