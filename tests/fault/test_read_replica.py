"""A read replica SIGKILLed under load, its data thrown away and re-created with pg_basebackup while the
load goes on: its query service recovers by itself, and no token read through it answers older than
its token. Nothing lost, nothing applied twice, read = write, and the replica = the read primary."""

from __future__ import annotations

import functools
import shutil
import time
from dataclasses import replace
from pathlib import Path

import grpc
import psycopg

from orders import local_stack
from orders.db import libpq_url
from orders.v1 import queries_pb2, queries_pb2_grpc
from tests.fault import harness
from tests.support import Infra, eventually, isolated_settings, start_serving


def order_versions(url: str) -> dict[str, int]:
    with psycopg.connect(libpq_url(url)) as conn:
        return {row[0]: row[1] for row in conn.execute("SELECT order_id, version FROM order_summaries")}


def test_a_read_replica_killed_and_recreated_under_load(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    started = time.monotonic()
    primary = local_stack.start_postgres(tmp_path / "primary", durable=False, options={"synchronous_commit": "on"})
    replica: local_stack.LocalPostgres | None = None
    query: local_stack.ManagedProcess | None = None
    try:
        base = isolated_settings(infra, nats_url=own_nats.url)
        settings = replace(
            base, write_database_url=primary.url("orders_write"), read_database_url=primary.url("orders_read")
        )
        with harness.loaded_system(settings, tmp_path, "rr", total=1600) as (system, client, load):
            replica = local_stack.start_replica(primary, tmp_path / "replica", durable=False)
            on_replica = replace(harness.with_addresses(settings), query_database_url=replica.url("orders_read"))
            query = start_serving("query_service", on_replica, tmp_path / "query")
            with grpc.insecure_channel(on_replica.query_addr) as channel, load.running():
                queries = queries_pb2_grpc.QueryServiceStub(channel)
                harness.wait_for_count(load, 400)
                replica.process.kill()
                eventually(lambda: harness.health(on_replica.query_addr) == "NOT_SERVING", 30, "its query service down")
                shutil.rmtree(tmp_path / "replica")  # lost with its disk: copied again from the primary
                replica = local_stack.start_replica(primary, tmp_path / "replica", replica.port, durable=False)
                eventually(lambda: harness.health(on_replica.query_addr) == "SERVING", 60, "its query service back")
                fault_end = time.monotonic()
                harness.wait_for_count(load, 1200)
                # Token reads through the re-created replica while the load goes on: never older than the token.
                recent = [c for c in client.ledger[-200:] if c.kind == "place" and c.ok]
                for command in recent[:50]:
                    request = queries_pb2.GetOrderSummaryRequest(
                        order_id=command.order_id, consistency_token=command.consistency_token
                    )
                    # The first call on a pooled connection the kill broke is UNAVAILABLE (retryable).
                    summary: queries_pb2.OrderSummary = eventually(
                        functools.partial(_answer, queries, request), 30, "a token read through the replica"
                    )
                    assert summary.order_id == command.order_id and summary.version >= 1
                caught_up = harness.caught_up_after(settings, fault_end)
            harness.finish("read replica SIGKILL + re-created", system, client, caught_up, started)
            primary_rows = order_versions(settings.read_database_url)
            eventually(lambda: order_versions(on_replica.query_database) == primary_rows, 60, "replica = primary")
            assert len(primary_rows) >= 1000
    finally:
        if query is not None:
            query.stop()
        if replica is not None:
            replica.stop()
        primary.stop()


def _answer(
    queries: queries_pb2_grpc.QueryServiceStub, request: queries_pb2.GetOrderSummaryRequest
) -> queries_pb2.OrderSummary | None:
    try:
        summary: queries_pb2.OrderSummary = queries.GetOrderSummary(request, timeout=10).summary
        return summary
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err  # never NOT_FOUND: no answer older than the token
        return None
