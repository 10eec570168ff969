"""Query services on streaming replicas of the read database: no answer older than its token.

A system of its own: a read primary (its PostgreSQL cluster also holds the write database) with two hot
standbys made by pg_basebackup, the command service and the projector on the primary, and three
query services, one on the primary and one on each replica.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from dataclasses import dataclass, replace

import grpc
import psycopg
import pytest

from orders import local_stack
from orders.config import Settings
from orders.db import libpq_url
from orders.local_stack import LocalPostgres, ManagedProcess
from orders.v1 import commands_pb2, commands_pb2_grpc, queries_pb2, queries_pb2_grpc
from tests.e2e.test_watch import Watcher
from tests.support import (
    Infra,
    add_product,
    eventually,
    isolated_settings,
    migrate,
    new_id,
    new_sku,
    place,
    scrape_metrics,
    start_serving,
)

# Above the projector's lag reports' interval (2 s) with room to spare, so that `projection` health turns
# NOT_SERVING here because of the paused replica, not for a report a moment old.
LAG_ALERT_SECONDS = 6.0


@dataclass
class QueryNode:
    settings: Settings
    process: ManagedProcess
    stub: queries_pb2_grpc.QueryServiceStub


@dataclass
class Replicated:
    settings: Settings
    primary: LocalPostgres
    replicas: list[LocalPostgres]
    commands: commands_pb2_grpc.CommandServiceStub
    queries: list[QueryNode]  # [on the primary, on replica 1, on replica 2]


@pytest.fixture(scope="module")
def replicated(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicated]:
    """The system, shared by this module's tests (each leaves it whole: replicas it stops are restarted)."""
    tmp_path = tmp_path_factory.mktemp("replicated")
    # Commits wait for their WAL to be written (the shared test cluster's synchronous_commit=off would
    # hold each commit's WAL back from the replicas for up to wal_writer_delay).
    primary = local_stack.start_postgres(tmp_path / "primary", durable=False, options={"synchronous_commit": "on"})
    nats = local_stack.start_nats(tmp_path / "nats")  # its own: the event subjects are the same in every system
    servers: list[LocalPostgres | local_stack.LocalNats] = [nats, primary]
    processes: list[ManagedProcess] = []
    replicas: list[LocalPostgres] = []
    channels: list[grpc.Channel] = []
    try:
        base = isolated_settings(infra, nats_url=nats.url, lag_alert_seconds=LAG_ALERT_SECONDS)
        settings = replace(
            base,
            write_database_url=primary.url(f"orders_write_{base.stream.lower()}"),
            read_database_url=primary.url(f"orders_read_{base.stream.lower()}"),
        )
        asyncio.run(migrate(settings))
        for n in (1, 2):
            replicas.append(local_stack.start_replica(primary, tmp_path / f"replica{n}", durable=False))
        processes.append(start_serving("command_service", settings, tmp_path / "logs"))
        processes.append(start_serving("projector", settings, tmp_path / "logs"))
        queries = []
        for n, server in enumerate([primary, *replicas]):
            own = replace(
                settings,
                **{k: v for k, v in local_stack.free_addresses().items() if k.startswith("query_")},
                query_database_url=server.url(f"orders_read_{base.stream.lower()}"),
            )
            proc = start_serving("query_service", own, tmp_path / f"query{n}")
            processes.append(proc)
            channels.append(grpc.insecure_channel(own.query_addr))
            queries.append(QueryNode(own, proc, queries_pb2_grpc.QueryServiceStub(channels[-1])))
        channels.append(grpc.insecure_channel(settings.command_addr))
        yield Replicated(settings, primary, replicas, commands_pb2_grpc.CommandServiceStub(channels[-1]), queries)
    finally:
        for channel in channels:
            channel.close()
        for proc in reversed(processes):
            proc.stop()
        for replica in replicas:
            replica.stop()
        for infra_server in reversed(servers):
            infra_server.stop()


def on_replica(node: QueryNode) -> bool:
    return scrape_metrics(node.settings.query_metrics_addr).get("orders_query_on_replica") == 1.0


def test_query_services_on_replicas_follow_the_projector_through_its_announcements(replicated: Replicated) -> None:
    assert [on_replica(node) for node in replicated.queries] == [False, True, True]
    with psycopg.connect(libpq_url(replicated.replicas[0].url("postgres"))) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):  # why the announcements exist
            conn.execute("LISTEN orders_read_changes")


def test_a_token_read_through_any_query_service_finds_the_command_it_follows(replicated: Replicated) -> None:
    sku = new_sku("R")
    add_product(replicated.commands, sku, stock=1000)
    found = 0
    for n in range(200):
        placed = place(replicated.commands, f"rr-{n % 7}", (sku, 1))
        node = replicated.queries[n % 3]
        summary = node.stub.GetOrderSummary(
            queries_pb2.GetOrderSummaryRequest(order_id=placed.order_id, consistency_token=placed.consistency_token),
            timeout=10,
        ).summary
        found += summary.order_id == placed.order_id and summary.version == 1
    assert found == 200


def test_a_watch_through_a_replica_resumes_without_gaps_or_repeats(replicated: Replicated) -> None:
    sku, customer = new_sku("W"), f"rw-{new_id()}"
    add_product(replicated.commands, sku, stock=100)
    replica = replicated.queries[1].stub
    first = place(replicated.commands, customer, (sku, 1))
    watcher = Watcher(
        replica,
        queries_pb2.WatchOrderSummariesRequest(
            customer_id=customer, include_snapshot=True, consistency_token=first.consistency_token
        ),
    )
    try:
        seen = [watcher.next().summary]
        live = [place(replicated.commands, customer, (sku, 1)) for _ in range(3)]
        seen += [watcher.next().summary for _ in live]
        with psycopg.connect(libpq_url(replicated.replicas[0].url("postgres")), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")  # announced before the replica shows them
            try:
                held = [place(replicated.commands, customer, (sku, 1)) for _ in range(2)]
                assert token_read(replicated.queries[1], held[-1], timeout=1) == "UNAVAILABLE"  # not replayed
            finally:
                conn.execute("SELECT pg_wal_replay_resume()")
        seen += [watcher.next().summary for _ in held]
        assert [(s.order_id, s.version) for s in seen] == [(p.order_id, 1) for p in [first, *live, *held]]
    finally:
        watcher.close()
    last_seen = seen[-1].stream_sequence
    missed = [place(replicated.commands, customer, (sku, 1)) for _ in range(3)]
    cancelled = replicated.commands.CancelOrder(
        commands_pb2.CancelOrderRequest(request_id=new_id(), order_id=first.order_id, reason="changed my mind"),
        timeout=10,
    )
    resumed = Watcher(
        replica,
        queries_pb2.WatchOrderSummariesRequest(
            customer_id=customer, after_sequence=last_seen, consistency_token=cancelled.consistency_token
        ),
    )
    try:
        got = [resumed.next().summary for _ in range(4)]
        assert [(s.order_id, s.version) for s in got] == [(p.order_id, 1) for p in missed] + [(first.order_id, 2)]
        sequences = [s.stream_sequence for s in got]
        assert sequences == sorted(set(sequences)) and sequences[0] > last_seen
        after = place(replicated.commands, customer, (sku, 1))
        assert resumed.next().summary.order_id == after.order_id  # then live, nothing repeated
        with pytest.raises(queue.Empty):
            resumed.received.get(timeout=1)
    finally:
        resumed.close()


def token_read(node: QueryNode, placed: commands_pb2.PlaceOrderResponse, timeout: float = 10) -> str:
    """The order's id as the node answers a read with the command's token (its status code's name if it fails)."""
    try:
        request = queries_pb2.GetOrderSummaryRequest(
            order_id=placed.order_id, consistency_token=placed.consistency_token
        )
        return str(node.stub.GetOrderSummary(request, timeout=timeout).summary.order_id)
    except grpc.RpcError as err:
        return str(err.code().name)


def health(node: QueryNode, service: str = "") -> str | None:
    return local_stack.grpc_health(node.settings.query_addr, service)


def test_a_replica_that_stops_replaying_never_answers_older_than_a_token_and_turns_lagging(
    replicated: Replicated,
) -> None:
    sku = new_sku("P")
    add_product(replicated.commands, sku, stock=10)
    paused, replica = replicated.queries[2], libpq_url(replicated.replicas[1].url("postgres"))
    eventually(lambda: health(paused, "projection") == "SERVING", 30, "projection health SERVING")
    with psycopg.connect(replica, autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
        try:
            placed = place(replicated.commands, "paused", (sku, 1))
            # Not the stale answer (NOT_FOUND): the replica has not replayed the order, so the read waits
            # until its deadline and says so.
            assert token_read(paused, placed, timeout=2) == "UNAVAILABLE"
            assert [token_read(node, placed) for node in replicated.queries[:2]] == [placed.order_id] * 2
            metrics = eventually(
                lambda: (
                    (m := scrape_metrics(paused.settings.query_metrics_addr))["orders_read_replica_lag_seconds"]
                    > LAG_ALERT_SECONDS
                    and m
                ),
                30,
                "the replica lag past the alert threshold",
            )
            assert metrics["orders_read_replica_lag_bytes"] > 0
            eventually(lambda: health(paused, "projection") == "NOT_SERVING", 30, "projection health NOT_SERVING")
            # The first reason logged: the replica's lag, or the projector's lag report (written on the
            # primary) not replayed for as long.
            logged = paused.process.log_tail(400)
            assert "NOT_SERVING: the read replica lags" in logged or "last lag report is" in logged, logged
            assert health(paused) == "SERVING"  # it still answers what it has (reads without a token)
        finally:
            conn.execute("SELECT pg_wal_replay_resume()")
    assert token_read(paused, placed) == placed.order_id
    eventually(lambda: health(paused, "projection") == "SERVING", 30, "projection health SERVING again")
    assert scrape_metrics(paused.settings.query_metrics_addr)["orders_read_replica_lag_bytes"] == 0


def test_a_stopped_replica_fails_only_its_own_query_service(replicated: Replicated) -> None:
    sku = new_sku("S")
    add_product(replicated.commands, sku, stock=10)
    down_node, server = replicated.queries[1], replicated.replicas[0]
    server.stop()
    try:
        eventually(lambda: health(down_node) == "NOT_SERVING", 30, "the stopped replica's query service NOT_SERVING")
        placed = place(replicated.commands, "stopped", (sku, 1))
        assert token_read(down_node, placed, timeout=2) == "UNAVAILABLE"
        others = [replicated.queries[0], replicated.queries[2]]
        assert [token_read(node, placed) for node in others] == [placed.order_id] * 2
        assert [health(node) for node in others] == ["SERVING", "SERVING"]
    finally:
        restarted = local_stack.start_replica(replicated.primary, server.data_dir, server.port, durable=False)
        replicated.replicas[0] = restarted
    eventually(lambda: health(down_node) == "SERVING", 30, "its query service SERVING again")
    # A pooled connection the restart broke fails one call with UNAVAILABLE (retryable), as on a primary.
    eventually(lambda: token_read(down_node, placed) == placed.order_id, 30, "the order read through it again")
