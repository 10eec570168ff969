"""Projector processes against a shared stream: consumer set-up, two instances at once, SIGKILLs, verify."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import psycopg

from orders import jetstream, local_stack
from orders.config import Settings
from orders.db import libpq_url
from orders.v1 import commands_pb2, commands_pb2_grpc, common_pb2
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


def start_projector(settings: Settings, log_dir: Path) -> local_stack.ManagedProcess:
    return start_serving("projector", settings, log_dir)


def with_changes(settings: Settings, **changes: object) -> Settings:
    return Settings(**{**settings.__dict__, **changes})


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orders.cli", *args],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_consumer_is_created_and_updated_from_settings(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    settings = isolated_settings(infra, nats_url=own_nats.url, ack_wait=12.0)
    asyncio.run(migrate(settings))
    asyncio.run(publish_events(settings, []))  # the stream, as the command side would create it

    async def consumer_config() -> tuple[float, int, str]:
        nc = await jetstream.connect(settings.nats_url, "test", retry_forever=False)
        try:
            config = (await nc.jsm().consumer_info(settings.stream, settings.consumer)).config
            return config.ack_wait or 0, config.max_deliver or 0, str(config.ack_policy)
        finally:
            await jetstream.close(nc)

    first = start_projector(settings, tmp_path)
    first.stop()
    assert asyncio.run(consumer_config()) == (12.0, -1, "explicit")
    again = start_projector(with_changes(settings, ack_wait=45.0), tmp_path)  # same consumer, new settings
    again.stop()
    assert asyncio.run(consumer_config())[0] == 45.0


def test_two_projectors_on_one_consumer_equal_one_projector(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    history = synthetic_history(5000, 200, 20, seed=11, prefix=f"T{uuid.uuid4().hex[:6]}")
    pair = isolated_settings(infra, nats_url=own_nats.url, projector_batch=16, consumer="pair")
    single = with_changes(isolated_settings(infra, nats_url=own_nats.url), stream=pair.stream, consumer="single")
    for settings in (pair, single):
        asyncio.run(migrate(settings))
    asyncio.run(publish_events(pair, []))  # the stream, as the command side would create it
    procs = [
        start_projector(pair, tmp_path / "a"),
        start_projector(with_changes(pair, **local_stack.free_addresses()), tmp_path / "b"),
        start_projector(single, tmp_path / "c"),
    ]
    try:
        # 256 publishes in flight reorder events within an aggregate now and then; 5% are published twice.
        asyncio.run(publish_events(pair, history.events, duplicate_share=0.05))
        eventually(lambda: projects(pair, history), 90, "two projectors reach the final state")
        eventually(lambda: projects(single, history), 90, "one projector reaches the final state")
        assert read_rows(pair) == read_rows(single)
        # Each projector logs what it applied per batch: both took part, and no event was applied twice.
        applied = [sum(map(int, re.findall(r"applied a batch of (\d+)", p.log_path.read_text()))) for p in procs[:2]]
        assert all(count > 0 for count in applied) and sum(applied) == len(history.events), applied
    finally:
        for proc in procs:
            proc.stop()


def test_sigkilled_projector_leaves_read_model_equal_to_write_model(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    settings = isolated_settings(infra, nats_url=own_nats.url, projector_batch=8, ack_wait=2.0)
    asyncio.run(migrate(settings))
    command = start_serving("command_service", settings, tmp_path / "c")
    projector = start_projector(settings, tmp_path / "p")
    channel = grpc.insecure_channel(settings.command_addr)
    stub = commands_pb2_grpc.CommandServiceStub(channel)
    skus = [f"K{i}" for i in range(8)]
    try:
        for sku in skus:
            stub.UpsertProduct(
                commands_pb2.UpsertProductRequest(
                    request_id=str(uuid.uuid4()),
                    sku=sku,
                    name=sku,
                    unit_price=common_pb2.Money(currency_code="EUR", minor_units=99),
                ),
                timeout=10,
            )
            stub.UpdateInventory(
                commands_pb2.UpdateInventoryRequest(request_id=str(uuid.uuid4()), sku=sku, set_level=100_000),
                timeout=10,
            )
        done = threading.Event()
        placed: list[str] = []

        def load() -> None:
            rng = random.Random(5)
            while not done.is_set() and len(placed) < 600:
                if placed and rng.random() < 0.3:
                    stub.CancelOrder(
                        commands_pb2.CancelOrderRequest(
                            request_id=str(uuid.uuid4()), order_id=placed.pop(rng.randrange(len(placed)))
                        ),
                        timeout=10,
                    )
                else:
                    reply = stub.PlaceOrder(
                        commands_pb2.PlaceOrderRequest(
                            request_id=str(uuid.uuid4()),
                            customer_id=f"c{rng.randint(1, 9)}",
                            lines=[
                                commands_pb2.PlaceOrderLine(sku=s, quantity=rng.randint(1, 3))
                                for s in rng.sample(skus, rng.randint(1, 4))
                            ],
                        ),
                        timeout=10,
                    )
                    placed.append(reply.order_id)

        loader = threading.Thread(target=load)
        loader.start()
        kills = 0
        try:
            for _ in range(4):  # SIGKILL mid-load, once the projector has applied something since its start
                base = applied_rows(settings)
                eventually(lambda: applied_rows(settings) > base + 20, 30, "projector making progress")  # noqa: B023
                projector.kill()
                kills += 1
                projector = start_projector(settings, tmp_path / "p")
        finally:
            done.set()
            loader.join(60)
        assert kills == 4
        eventually(lambda: cli(settings, "verify").returncode == 0, 90, "read model equals write model")
        report = cli(settings, "verify", "--json")
        assert json.loads(report.stdout)["orders_checked"] > 50

        with psycopg.connect(libpq_url(settings.read_database_url), autocommit=True) as conn:
            conn.execute("UPDATE product_views SET stock = stock + 1 WHERE sku = 'K3'")
        tampered = cli(settings, "verify")
        assert tampered.returncode == 1
        assert "product K3: stock is" in tampered.stdout and "1 differences" in tampered.stdout
    finally:
        channel.close()
        projector.stop()
        command.stop()


def read_count(settings: Settings, sql: str) -> int:
    """One number from the read database."""
    with psycopg.connect(libpq_url(settings.read_database_url)) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


def applied_rows(settings: Settings) -> int:
    return read_count(settings, "SELECT coalesce(sum(version), 0) FROM order_summaries")


def test_projector_health_follows_its_nats_connection(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    settings = isolated_settings(infra, nats_url=own_nats.url)
    asyncio.run(migrate(settings))
    asyncio.run(publish_events(settings, []))
    projector = start_projector(settings, tmp_path)
    nats = own_nats
    try:
        nats.stop()
        eventually(lambda: not local_stack.grpc_serving(settings.admin_addr), 15, "NOT_SERVING without NATS")
        nats = local_stack.start_nats(own_nats.config_path.parent, port=own_nats.port)
        eventually(lambda: local_stack.grpc_serving(settings.admin_addr), 15, "SERVING once NATS is back")
        assert projector.alive()
    finally:
        projector.stop()
        nats.stop()


def checkpoint(settings: Settings) -> int:
    return read_count(settings, "SELECT coalesce(max(last_stream_seq), 0) FROM projection_checkpoints")


def test_a_projector_stopped_mid_drain_leaves_nothing_waiting_for_ack_wait(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    """A projector fetches its next batch while the current one applies. Stopped (SIGTERM) in the middle
    of a backlog, it applies what it fetched before it exits: its successor finds every event delivered
    again or not yet delivered, and catches up long before ack_wait (60 s here) could have brought back
    anything held, and every event is applied exactly once across the two."""
    history = synthetic_history(8000, 800, 20, seed=13, prefix=f"S{uuid.uuid4().hex[:6]}")
    settings = isolated_settings(infra, nats_url=own_nats.url, projector_batch=8, ack_wait=60.0)
    asyncio.run(migrate(settings))
    asyncio.run(publish_events(settings, history.events))
    first = start_projector(settings, tmp_path / "a")
    try:
        eventually(lambda: checkpoint(settings) >= 500, 60, "the first projector under way")
    finally:
        first.stop()
    stopped_at = checkpoint(settings)
    assert stopped_at < len(history.events), "the backlog drained before the stop: nothing tested"
    second = start_projector(settings, tmp_path / "b")
    try:
        eventually(lambda: projects(settings, history), 40, "the successor caught up, well before ack_wait")
        applied = [
            sum(map(int, re.findall(r"applied a batch of (\d+)", p.log_path.read_text()))) for p in (first, second)
        ]
        assert sum(applied) == len(history.events), applied
    finally:
        second.stop()
