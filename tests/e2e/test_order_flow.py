"""End to end through gRPC: commands → write DB + outbox → JetStream → projector → read DB → queries."""

from __future__ import annotations

import queue
import threading

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from orders.db import libpq_url
from orders.v1 import commands_pb2, common_pb2, queries_pb2
from tests.support import Stack, add_product, bad_fields, eventually, new_id, new_sku, place


def product_view(stack: Stack, sku: str) -> queries_pb2.ProductView | None:
    reply = stack.queries.ListProducts(queries_pb2.ListProductsRequest(page_size=1000), timeout=5)
    return next((p for p in reply.products if p.sku == sku), None)


def summary(stack: Stack, order_id: str) -> queries_pb2.OrderSummary | None:
    try:
        return stack.queries.GetOrderSummary(queries_pb2.GetOrderSummaryRequest(order_id=order_id), timeout=5).summary
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def write_db_count(stack: Stack, sql: str, *params: object) -> int:
    with psycopg.connect(libpq_url(stack.settings.write_database_url)) as conn:
        row = conn.execute(sql, params).fetchone()
        assert row is not None
        return int(row[0])


def test_place_then_cancel_is_visible_through_queries(stack: Stack) -> None:
    widget, gadget = new_sku(), new_sku()
    add_product(stack.commands, widget, price=1999, stock=10, name="Blue widget")
    add_product(stack.commands, gadget, price=500, stock=5, name="Red gadget")
    customer = f"cust-{new_id()}"

    placed = place(stack.commands, customer, (widget, 2), (gadget, 1))
    assert placed.version == 1
    assert placed.total == common_pb2.Money(currency_code="EUR", minor_units=2 * 1999 + 500)
    assert placed.consistency_token

    seen: queries_pb2.OrderSummary = eventually(
        lambda: summary(stack, placed.order_id), timeout=2, what="order summary projected"
    )
    assert seen.customer_id == customer
    assert seen.status == common_pb2.ORDER_STATUS_PLACED
    assert [(line.sku, line.name, line.quantity, line.unit_price.minor_units) for line in seen.lines] == [
        (widget, "Blue widget", 2, 1999),
        (gadget, "Red gadget", 1, 500),
    ]
    assert seen.item_count == 3 and seen.total.minor_units == 4498
    eventually(lambda: (p := product_view(stack, widget)) and p.stock == 8, timeout=2, what="widget stock 8")
    eventually(lambda: (p := product_view(stack, gadget)) and p.stock == 4, timeout=2, what="gadget stock 4")

    cancelled = stack.commands.CancelOrder(
        commands_pb2.CancelOrderRequest(request_id=new_id(), order_id=placed.order_id, reason="changed my mind"),
        timeout=5,
    )
    assert cancelled.version == 2
    after: queries_pb2.OrderSummary = eventually(
        lambda: (s := summary(stack, placed.order_id)) and s.status == common_pb2.ORDER_STATUS_CANCELLED and s,
        timeout=2,
        what="order cancelled in the read model",
    )
    assert after.cancel_reason == "changed my mind" and after.version == 2
    eventually(lambda: (p := product_view(stack, widget)) and p.stock == 10, timeout=2, what="widget stock back")
    eventually(lambda: (p := product_view(stack, gadget)) and p.stock == 5, timeout=2, what="gadget stock back")

    with pytest.raises(grpc.RpcError) as again:
        stack.commands.CancelOrder(
            commands_pb2.CancelOrderRequest(request_id=new_id(), order_id=placed.order_id), timeout=5
        )
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_order_beyond_stock_is_refused_and_changes_nothing(stack: Stack) -> None:
    sku = new_sku()
    add_product(stack.commands, sku, price=100, stock=3)
    before: queries_pb2.ProductView = eventually(
        lambda: (p := product_view(stack, sku)) and p.stock == 3 and p, timeout=2, what="stock 3"
    )
    customer = f"cust-{new_id()}"

    with pytest.raises(grpc.RpcError) as refused:
        place(stack.commands, customer, (sku, 4))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(refused.value)
    assert status is not None
    failure = error_details_pb2.PreconditionFailure()
    assert status.details[0].Unpack(failure)
    assert failure.violations[0].type == "INSUFFICIENT_STOCK" and failure.violations[0].subject == sku

    assert write_db_count(stack, "SELECT count(*) FROM orders WHERE customer_id = %s", customer) == 0
    assert write_db_count(stack, "SELECT stock FROM products WHERE sku = %s", sku) == 3
    # A later write to the same product is projected; had the refused order changed anything, the
    # product's version or stock would show it.
    stack.commands.UpdateInventory(
        commands_pb2.UpdateInventoryRequest(request_id=new_id(), sku=sku, delta=1), timeout=5
    )
    after: queries_pb2.ProductView = eventually(
        lambda: (p := product_view(stack, sku)) and p.stock == 4 and p, timeout=2, what="stock 4"
    )
    assert after.version == before.version + 1
    listed = list(
        stack.queries.ListOrderSummaries(
            queries_pb2.ListOrderSummariesRequest(filter=queries_pb2.OrderFilter(customer_id=customer)), timeout=5
        )
    )
    assert listed == []


def test_repeated_request_id_returns_the_same_order_and_places_nothing_new(stack: Stack) -> None:
    sku = new_sku()
    add_product(stack.commands, sku, price=250, stock=10)
    customer = f"cust-{new_id()}"
    request_id = new_id()

    first = place(stack.commands, customer, (sku, 3), request_id=request_id)
    second = place(stack.commands, customer, (sku, 3), request_id=request_id)

    assert second == first  # same order id, version and consistency token
    assert write_db_count(stack, "SELECT count(*) FROM orders WHERE customer_id = %s", customer) == 1
    assert write_db_count(stack, "SELECT stock FROM products WHERE sku = %s", sku) == 7
    with pytest.raises(grpc.RpcError) as reused:
        place(stack.commands, customer, (sku, 4), request_id=request_id)
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    eventually(lambda: summary(stack, first.order_id), timeout=2, what="order projected")
    orders = list(
        stack.queries.ListOrderSummaries(
            queries_pb2.ListOrderSummariesRequest(filter=queries_pb2.OrderFilter(customer_id=customer)), timeout=5
        )
    )
    assert [o.summary.order_id for o in orders] == [first.order_id]


def test_consistency_token_gives_read_your_writes(stack: Stack) -> None:
    sku = new_sku()
    add_product(stack.commands, sku, price=10, stock=100)
    for _ in range(20):
        placed = place(stack.commands, "ryw-customer", (sku, 1))
        reply = stack.queries.GetOrderSummary(
            queries_pb2.GetOrderSummaryRequest(order_id=placed.order_id, consistency_token=placed.consistency_token),
            timeout=5,
        )
        assert reply.summary.order_id == placed.order_id


def test_watch_receives_placed_and_cancelled_updates(stack: Stack) -> None:
    sku = new_sku()
    add_product(stack.commands, sku, price=700, stock=5)
    customer = f"cust-{new_id()}"
    earlier = place(stack.commands, customer, (sku, 1))
    eventually(lambda: summary(stack, earlier.order_id), timeout=2, what="earlier order projected")
    received: queue.Queue[queries_pb2.WatchOrderSummariesResponse | BaseException] = queue.Queue()
    call = stack.queries.WatchOrderSummaries(
        queries_pb2.WatchOrderSummariesRequest(customer_id=customer, include_snapshot=True), timeout=30
    )

    def read() -> None:
        try:
            for message in call:
                received.put(message)
        except BaseException as exc:  # the cancel at the end of the test lands here
            received.put(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # The server subscribes to changes before it reads the snapshot, so once the snapshot has
        # arrived every later change must arrive too.
        first = received.get(timeout=5)
        assert not isinstance(first, BaseException), first
        assert (first.summary.order_id, first.snapshot) == (earlier.order_id, True)

        placed = place(stack.commands, customer, (sku, 2))
        stack.commands.CancelOrder(
            commands_pb2.CancelOrderRequest(request_id=new_id(), order_id=placed.order_id, reason="test"), timeout=5
        )
        updates = [received.get(timeout=5), received.get(timeout=5)]
        for update in updates:
            assert not isinstance(update, BaseException), update
        assert [(u.summary.order_id, u.summary.status, u.snapshot) for u in updates] == [  # type: ignore[union-attr]
            (placed.order_id, common_pb2.ORDER_STATUS_PLACED, False),
            (placed.order_id, common_pb2.ORDER_STATUS_CANCELLED, False),
        ]
    finally:
        call.cancel()
        reader.join(5)


def test_invalid_command_gets_field_violations_and_writes_nothing(stack: Stack) -> None:
    before = write_db_count(stack, "SELECT count(*) FROM idempotency_keys")
    with pytest.raises(grpc.RpcError) as bad:
        stack.commands.PlaceOrder(
            commands_pb2.PlaceOrderRequest(
                request_id=new_id(),
                customer_id="",
                lines=[commands_pb2.PlaceOrderLine(sku="no spaces!", quantity=0)],
            ),
            timeout=5,
        )
    assert bad_fields(bad.value) == {"customer_id", "lines[0].sku", "lines[0].quantity"}
    assert write_db_count(stack, "SELECT count(*) FROM idempotency_keys") == before


def test_unknown_product_is_not_found(stack: Stack) -> None:
    with pytest.raises(grpc.RpcError) as missing:
        place(stack.commands, "someone", (new_sku(), 1))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_search_and_list_products(stack: Stack) -> None:
    sku = new_sku()
    add_product(stack.commands, sku, price=1234, stock=2, name=f"Gizmo {sku}")
    customer = f"searcher-{new_id()}"
    placed = place(stack.commands, customer, (sku, 1))
    found = eventually(
        lambda: stack.queries.SearchOrders(queries_pb2.SearchOrdersRequest(query=sku), timeout=5).summaries,
        timeout=2,
        what="order found by SKU",
    )
    assert [s.order_id for s in found] == [placed.order_id]
    by_customer = stack.queries.SearchOrders(
        queries_pb2.SearchOrdersRequest(query="gizmo", filter=queries_pb2.OrderFilter(customer_id=customer)), timeout=5
    )
    assert [s.order_id for s in by_customer.summaries] == [placed.order_id]
    prefixed = stack.queries.ListProducts(queries_pb2.ListProductsRequest(name_prefix=f"gizmo {sku}"), timeout=5)
    assert [(p.sku, p.stock, p.unit_price.minor_units) for p in prefixed.products] == [(sku, 1, 1234)]
    with pytest.raises(grpc.RpcError) as bad_token:
        stack.queries.SearchOrders(queries_pb2.SearchOrdersRequest(query="x", page_token="garbage!"), timeout=5)
    assert bad_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT
