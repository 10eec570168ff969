"""ORDERS_WORKERS: several processes of one service behind one port, supervised, against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orders import local_stack, security
from orders.config import Settings
from orders.db import libpq_url
from orders.v1 import commands_pb2, commands_pb2_grpc, queries_pb2, queries_pb2_grpc
from tests.support import (
    Infra,
    add_product,
    children,
    eventually,
    isolated_settings,
    migrate,
    new_id,
    new_sku,
    scrape_metrics,
    start_serving,
)


def by_worker(metrics_addr: str, sample_prefix: str, label: str = "") -> dict[str, float]:
    """From the supervisor's merged metrics: the samples starting with sample_prefix (and holding label),
    summed per worker label."""
    found: dict[str, float] = {}
    for sample, value in scrape_metrics(metrics_addr).items():
        if sample.startswith(sample_prefix) and label in sample:
            worker = sample.split('worker="', 1)[1].split('"', 1)[0]
            found[worker] = found.get(worker, 0.0) + value
    return found


def calls_by_worker(metrics_addr: str, method: str) -> dict[str, float]:
    """orders_rpc_requests_total of one method, per worker."""
    return by_worker(metrics_addr, "orders_rpc_requests_total{", f'method="{method}"')


def start_times(metrics_addr: str) -> dict[str, float]:
    """Each worker's process_start_time_seconds."""
    return by_worker(metrics_addr, "process_start_time_seconds{")


def upsert_on_a_new_connection(settings: Settings, sku: str) -> None:
    """One call on a channel of its own: a new TCP connection, which the kernel gives to either worker."""
    with security.client_channel(settings.command_addr, settings, own_connection=True) as channel:
        add_product(commands_pb2_grpc.CommandServiceStub(channel), sku, stock=1)


def test_two_workers_share_each_port_and_one_killed_is_replaced_without_the_port_going_dark(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    # A poll far longer than the test: the relay must learn of every worker's commits by its wake-ups.
    settings = isolated_settings(infra, nats_url=own_nats.url, workers=2, relay_poll_interval=60.0)
    asyncio.run(migrate(settings))
    procs = []
    workers: set[int] = set()
    try:
        procs.append(start_serving("command_service", settings, tmp_path / "logs"))
        procs.append(start_serving("query_service", settings, tmp_path / "logs"))
        procs.append(start_serving("projector", settings, tmp_path / "logs"))
        supervisor = procs[0].pid
        workers = eventually(lambda: children(supervisor) if len(children(supervisor)) == 2 else None, 30)
        query_workers = eventually(lambda: children(procs[1].pid) if len(children(procs[1].pid)) == 2 else None)
        workers |= query_workers

        # 1. Both workers serve: new connections land on either, each worker counts its own calls.
        skus = [new_sku("W") for _ in range(24)]
        for sku in skus:
            upsert_on_a_new_connection(settings, sku)
        served = calls_by_worker(settings.command_metrics_addr, "UpsertProduct")
        assert set(served) == {"0", "1"} and sum(served.values()) == len(skus), served
        for _ in range(24):
            with security.client_channel(settings.query_addr, settings, own_connection=True) as ch:
                queries_pb2_grpc.QueryServiceStub(ch).ListProducts(queries_pb2.ListProductsRequest(), timeout=10)
        assert set(calls_by_worker(settings.query_metrics_addr, "ListProducts")) == {"0", "1"}

        # 2. Whichever worker committed, the one publishing relay published it at once (no 60 s poll).
        def outbox_drained() -> bool:
            with psycopg.connect(libpq_url(settings.write_database_url)) as conn:
                row = conn.execute("SELECT count(*) FROM outbox").fetchone()
            return row is not None and row[0] == 0

        eventually(outbox_drained, 15, "every worker's events published")

        # 3. Kill one worker as a crash would: the port keeps answering, and a new worker takes its place.
        started = start_times(settings.command_metrics_addr)
        assert set(started) == {"0", "1"}
        victim = min(children(supervisor))
        os.kill(victim, signal.SIGKILL)
        eventually(lambda: not local_stack.pid_alive(victim) or None, 10, "the worker gone")
        for sku in [new_sku("K") for _ in range(10)]:
            upsert_on_a_new_connection(settings, sku)  # raises if the port went dark
        with grpc.insecure_channel(settings.command_addr) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        replaced = eventually(
            lambda: children(supervisor) if len(children(supervisor) - {victim}) == 2 else None,
            30,
            "a replacement worker",
        )
        workers |= replaced
        assert victim not in replaced
        restarted = eventually(
            lambda: [w for w, t in start_times(settings.command_metrics_addr).items() if t > started[w]],
            30,
            "the replacement's metrics",
        )
        assert len(restarted) == 1 and set(start_times(settings.command_metrics_addr)) == {"0", "1"}
        with grpc.insecure_channel(settings.command_addr) as channel:
            placed = commands_pb2_grpc.CommandServiceStub(channel).PlaceOrder(
                commands_pb2.PlaceOrderRequest(
                    request_id=new_id(),
                    customer_id="workers",
                    lines=[commands_pb2.PlaceOrderLine(sku=skus[0], quantity=1)],
                ),
                timeout=10,
            )
        with grpc.insecure_channel(settings.query_addr) as channel:
            summary = queries_pb2_grpc.QueryServiceStub(channel).GetOrderSummary(
                queries_pb2.GetOrderSummaryRequest(
                    order_id=placed.order_id, consistency_token=placed.consistency_token
                ),
                timeout=15,
            )
        assert summary.summary.order_id == placed.order_id

        # 4. Stopping the supervisor stops its workers.
        procs[0].stop()
        eventually(lambda: not any(local_stack.pid_alive(p) for p in replaced) or None, 20, "workers stopped")
    finally:
        for proc in procs:
            proc.stop()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
