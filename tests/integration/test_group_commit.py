"""PlaceOrders that arrive while a transaction is in flight share the next one (group commit), against a
real command service, PostgreSQL and NATS: each keeps its own outcome, and a shared transaction that
fails as a whole is tried again order by order.

A test holds one product's row lock, so that a first order on it stays in flight; the orders sent
meanwhile wait for it (the service's waiting gauge counts them) and go together into the next transaction
once the lock is released. They are sent one after another, so their arrival order is known."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg

from command_service.handlers import request_hash
from orders import local_stack
from orders.config import Settings
from orders.db import libpq_url
from orders.v1 import commands_pb2
from tests.support import (
    CommandProcess,
    Infra,
    add_product,
    assert_stream_matches_write_database,
    eventually,
    isolated_settings,
    migrate,
    new_id,
    new_sku,
    scrape_metrics,
    unpublished,
)


def order(customer: str, *lines: tuple[str, int], request_id: str | None = None) -> commands_pb2.PlaceOrderRequest:
    return commands_pb2.PlaceOrderRequest(
        request_id=request_id or new_id(),
        customer_id=customer,
        lines=[commands_pb2.PlaceOrderLine(sku=s, quantity=q) for s, q in lines],
    )


LOCKING = "SELECT sku, name%"  # the first round trip of a PlaceOrder transaction
WRITING = "WITH w0 AS%"  # its second


def lock_waiters(settings: Settings, statement: str) -> int:
    """Sessions of the write database waiting for a lock in a statement that starts like `statement`."""
    with psycopg.connect(libpq_url(settings.write_database_url)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            " AND query LIKE %s",
            (statement,),
        ).fetchone()
    return row[0] if row else 0


def stock_of(settings: Settings, sku: str) -> tuple[int, int]:
    with psycopg.connect(libpq_url(settings.write_database_url)) as conn:
        row = conn.execute("SELECT stock, version FROM products WHERE sku = %s", (sku,)).fetchone()
    assert row is not None
    return row[0], row[1]


def orders_of(settings: Settings, customer: str) -> int:
    with psycopg.connect(libpq_url(settings.write_database_url)) as conn:
        row = conn.execute("SELECT count(*) FROM orders WHERE customer_id = %s", (customer,)).fetchone()
    return row[0] if row else 0


def held_in_flight(settings: Settings) -> None:
    eventually(lambda: lock_waiters(settings, LOCKING) == 1, 10, "the first order waits for the locked product")


@contextlib.contextmanager
def row_locked(settings: Settings, sku: str) -> Iterator[None]:
    """Hold a product's row lock (FOR UPDATE) until the block ends, then commit."""
    with psycopg.connect(libpq_url(settings.write_database_url)) as conn:
        conn.execute("SELECT 1 FROM products WHERE sku = %s FOR UPDATE", (sku,))
        yield
        conn.commit()


@contextlib.contextmanager
def command_service(infra: Infra, nats: local_stack.LocalNats, tmp_path: Path) -> Iterator[CommandProcess]:
    """A command service of its own, on a nats-server of its own (streams of two systems on one server
    would overlap in subjects)."""
    settings = isolated_settings(infra, nats_url=nats.url)
    asyncio.run(migrate(settings))
    service = CommandProcess(settings, tmp_path)
    try:
        yield service
    finally:
        service.stop()


class Sender:
    """PlaceOrders sent one after another while a first one is held in flight: each is waiting in the
    service before the next is sent, so they wait in the order sent."""

    def __init__(self, service: CommandProcess) -> None:
        self.service = service
        self.calls: list[grpc.Future] = []

    def metric(self, name: str) -> float:
        return scrape_metrics(self.service.settings.command_metrics_addr).get(name, 0.0)

    def send(self, request: commands_pb2.PlaceOrderRequest) -> grpc.Future:
        call = self.service.stub.PlaceOrder.future(request, timeout=60)
        self.calls.append(call)
        waiting = len(self.calls) - 1  # the first is in flight, not waiting
        eventually(lambda: self.metric("orders_command_group_waiting") == waiting, 10, f"{waiting} orders waiting")
        return call


def outcome(call: grpc.Future) -> commands_pb2.PlaceOrderResponse | grpc.RpcError:
    error = call.exception(timeout=60)
    return error if error is not None else call.result()


def test_orders_waiting_share_one_transaction_and_each_keeps_its_own_outcome(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    with command_service(infra, own_nats, tmp_path) as service:
        settings = service.settings
        gate, a, b, dollars = new_sku("GATE"), new_sku("A"), new_sku("B"), new_sku("USD")
        add_product(service.stub, gate, stock=10)
        add_product(service.stub, a, stock=5)
        add_product(service.stub, b, stock=1)
        add_product(service.stub, dollars, stock=5, currency="USD")
        a_version, b_version = stock_of(settings, a)[1], stock_of(settings, b)[1]
        sender = Sender(service)
        groups_before = sender.metric("orders_command_group_size_count")
        sizes_before = sender.metric("orders_command_group_size_sum")
        first = order("group", (gate, 1))
        ok1 = order("group", (a, 2))
        requests = {
            "ok1": ok1,
            "ok2": order("group", (a, 2), (b, 1)),
            "short": order("group", (a, 2)),  # 1 left after ok1 and ok2
            "unknown": order("group", (new_sku("NONE"), 1)),
            "mixed": order("group", (a, 1), (dollars, 1)),  # takes nothing: the last unit of A stays
            "ok3": order("group", (a, 1)),  # that last unit
            "copy": ok1,  # the same request_id: waits for a later transaction, answered from what ok1 stored
            "reused": order("group", (b, 1), request_id=ok1.request_id),  # same request_id, other payload
        }
        with row_locked(settings, gate):
            sender.send(first)
            held_in_flight(settings)
            calls = {name: sender.send(request) for name, request in requests.items()}
        got = {name: outcome(call) for name, call in calls.items()}

        assert isinstance(outcome(sender.calls[0]), commands_pb2.PlaceOrderResponse)
        for name in ("ok1", "ok2", "ok3"):
            assert isinstance(got[name], commands_pb2.PlaceOrderResponse), (name, got[name])
        assert got["copy"] == got["ok1"]
        errors = {name: got[name] for name in ("short", "unknown", "mixed", "reused")}
        assert {name: err.code() for name, err in errors.items()} == {  # type: ignore[union-attr]
            "short": grpc.StatusCode.FAILED_PRECONDITION,
            "unknown": grpc.StatusCode.NOT_FOUND,
            "mixed": grpc.StatusCode.FAILED_PRECONDITION,
            "reused": grpc.StatusCode.ALREADY_EXISTS,
        }
        assert "2 requested, 1 available" in errors["short"].details()  # type: ignore[union-attr]
        assert "same currency" in errors["mixed"].details()  # type: ignore[union-attr]

        # The first order alone, the six different request_ids together, then each copy of ok1's alone.
        assert sender.metric("orders_command_group_size_count") - groups_before == 4
        assert sender.metric("orders_command_group_size_sum") - sizes_before == 1 + 6 + 1 + 1
        assert stock_of(settings, a) == (0, a_version + 3)  # three orders reserved A, one version each
        assert stock_of(settings, b) == (0, b_version + 1)
        assert stock_of(settings, dollars)[0] == 5
        assert orders_of(settings, "group") == 4
        reserved = [got["ok1"], got["ok2"], got["ok3"]]
        assert [r.total.minor_units for r in reserved] == [200, 300, 100]  # type: ignore[union-attr]
        eventually(lambda: unpublished(settings) == 0, 20, "the outbox drained")
        assert_stream_matches_write_database(settings)  # versions 1..n per aggregate, in stream order


def test_a_shared_transaction_that_fails_is_tried_again_order_by_order(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    """A concurrent copy of one request_id commits while the shared transaction waits to store it: the
    shared transaction fails as a whole and writes nothing; alone, the others are placed and that one
    is answered with what its copy stored."""
    with command_service(infra, own_nats, tmp_path) as service:
        settings = service.settings
        gate, a = new_sku("GATE"), new_sku("A")
        add_product(service.stub, gate, stock=10)
        add_product(service.stub, a, stock=10)
        sender = Sender(service)
        retries_before = sender.metric("orders_command_group_retries_total")
        taken = order("retry", (a, 1))
        stored = commands_pb2.PlaceOrderResponse(order_id="00000000-0000-4000-8000-000000000001", version=1)
        with psycopg.connect(libpq_url(settings.write_database_url)) as copy:
            with row_locked(settings, gate):
                sender.send(order("retry", (gate, 1)))
                held_in_flight(settings)
                placed = [sender.send(order("retry", (a, 1))), sender.send(order("retry", (a, 1)))]
                answered = sender.send(taken)
                copy.execute(  # the concurrent copy, not committed yet
                    "INSERT INTO idempotency_keys (request_id, command, request_hash, response)"
                    " VALUES (%s, %s, %s, %s)",
                    (taken.request_id, "PlaceOrder", request_hash(taken), stored.SerializeToString()),
                )
            eventually(lambda: lock_waiters(settings, WRITING) == 1, 10, "the shared transaction waits on the key")
            copy.commit()
        assert outcome(answered) == stored
        assert all(isinstance(outcome(call), commands_pb2.PlaceOrderResponse) for call in placed)
        assert sender.metric("orders_command_group_retries_total") - retries_before == 1
        assert stock_of(settings, a)[0] == 8
        assert orders_of(settings, "retry") == 3  # the first and the two others; none for the copy's request_id
        eventually(lambda: unpublished(settings) == 0, 20, "the outbox drained")
        assert_stream_matches_write_database(settings)
