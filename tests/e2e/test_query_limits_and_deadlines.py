"""Query inputs out of range are refused with the field named; a call past its deadline stops in the database."""

from __future__ import annotations

import uuid

import grpc
import psycopg
import pytest
from google.protobuf import timestamp_pb2

from orders.db import libpq_url
from orders.v1 import commands_pb2, queries_pb2
from tests.support import Stack, add_product, bad_fields, eventually, new_id, new_sku, place

FAR_FUTURE = timestamp_pb2.Timestamp(seconds=10**12)


@pytest.mark.parametrize(
    ("method", "request_", "fields"),
    [
        ("SearchOrders", queries_pb2.SearchOrdersRequest(query="x", page_size=1001), {"page_size"}),
        ("SearchOrders", queries_pb2.SearchOrdersRequest(query="x" * 201), {"query"}),
        ("SearchOrders", queries_pb2.SearchOrdersRequest(query="x", page_token="not-a-token"), {"page_token"}),
        (
            "SearchOrders",
            queries_pb2.SearchOrdersRequest(
                filter=queries_pb2.OrderFilter(customer_id="c" * 129, placed_before=FAR_FUTURE, status=99)  # type: ignore[arg-type]  # no such status
            ),
            {"filter.customer_id", "filter.placed_before", "filter.status"},
        ),
        ("ListProducts", queries_pb2.ListProductsRequest(page_size=-5), {"page_size"}),
        ("ListProducts", queries_pb2.ListProductsRequest(name_prefix="n" * 201), {"name_prefix"}),
        ("ListProducts", queries_pb2.ListProductsRequest(page_token="%%%"), {"page_token"}),
        ("GetOrderSummary", queries_pb2.GetOrderSummaryRequest(order_id="order-1"), {"order_id"}),
        (
            "GetOrderSummary",
            queries_pb2.GetOrderSummaryRequest(order_id=str(uuid.uuid4()), consistency_token="junk"),
            {"consistency_token"},
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_out_of_range_query_input_names_the_field(
    stack: Stack, method: str, request_: object, fields: set[str]
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        getattr(stack.queries, method)(request_, timeout=5)
    assert bad_fields(refused.value) == fields


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (queries_pb2.WatchOrderSummariesRequest(order_ids=[str(uuid.uuid4()) for _ in range(101)]), {"order_ids"}),
        (queries_pb2.WatchOrderSummariesRequest(order_ids=["x"]), {"order_ids[0]"}),
        (
            queries_pb2.ListOrderSummariesRequest(filter=queries_pb2.OrderFilter(placed_after=FAR_FUTURE)),
            {"filter.placed_after"},
        ),
    ],
    ids=["watch-too-many", "watch-bad-id", "list-bad-time"],
)
def test_out_of_range_stream_input_names_the_field(stack: Stack, request_: object, fields: set[str]) -> None:
    method = (
        stack.queries.WatchOrderSummaries
        if isinstance(request_, queries_pb2.WatchOrderSummariesRequest)
        else stack.queries.ListOrderSummaries
    )
    with pytest.raises(grpc.RpcError) as refused:
        list(method(request_, timeout=5))
    assert bad_fields(refused.value) == fields


def test_products_page_through_with_filters(stack: Stack) -> None:
    prefix = f"paged {new_id()[:8]}"
    skus = sorted(new_sku("P") for _ in range(5))
    for i, sku in enumerate(skus):
        add_product(stack.commands, sku, stock=0 if i == 2 else 3, name=f"{prefix} {i}")
    in_stock = [sku for i, sku in enumerate(skus) if i != 2]

    def all_pages(in_stock_only: bool) -> list[list[str]]:
        pages, token = [], ""
        while True:
            reply = stack.queries.ListProducts(
                queries_pb2.ListProductsRequest(
                    page_size=2, page_token=token, name_prefix=prefix.upper(), in_stock_only=in_stock_only
                ),
                timeout=5,
            )
            pages.append([p.sku for p in reply.products])
            token = reply.next_page_token
            if not token:
                return pages

    # every product and its stock projected (each product's stock comes with a later event)
    eventually(
        lambda: sum(map(len, all_pages(False))) == 5 and sum(map(len, all_pages(True))) == 4,
        10,
        "the products and their stock projected",
    )
    assert all_pages(False) == [skus[0:2], skus[2:4], skus[4:5]]
    assert all_pages(True) == [in_stock[0:2], in_stock[2:4]]


def waiting_on_locks(url: str, application: str) -> int:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
            (application,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_query_past_its_deadline_stops_in_the_database(stack: Stack) -> None:
    sku = new_sku("D")
    add_product(stack.commands, sku, stock=5)
    order = place(stack.commands, "deadline-reader", (sku, 1))
    url = stack.settings.read_database_url
    with psycopg.connect(libpq_url(url)) as blocker:
        blocker.execute("LOCK TABLE order_summaries IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(grpc.RpcError) as late:
            stack.queries.GetOrderSummary(queries_pb2.GetOrderSummaryRequest(order_id=order.order_id), timeout=1)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The service cancelled its statement when the deadline passed, while the lock is still held.
        eventually(lambda: waiting_on_locks(url, "orders-query") == 0, 5, "the late query cancelled")
        blocker.rollback()
    reply = stack.queries.GetOrderSummary(
        queries_pb2.GetOrderSummaryRequest(order_id=order.order_id, consistency_token=order.consistency_token),
        timeout=10,
    )
    assert reply.summary.order_id == order.order_id  # and the pool still works afterwards


def test_a_command_past_its_deadline_is_rolled_back_and_can_be_retried(stack: Stack) -> None:
    sku = new_sku("D")
    add_product(stack.commands, sku, stock=5)
    request = commands_pb2.PlaceOrderRequest(
        request_id=new_id(), customer_id="deadline-writer", lines=[commands_pb2.PlaceOrderLine(sku=sku, quantity=2)]
    )
    url = stack.settings.write_database_url
    with psycopg.connect(libpq_url(url)) as blocker:
        blocker.execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(grpc.RpcError) as late:
            stack.commands.PlaceOrder(request, timeout=1)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        eventually(lambda: waiting_on_locks(url, "orders-command") == 0, 5, "the late command cancelled")
        blocker.rollback()
    with psycopg.connect(libpq_url(url)) as conn:
        claimed = conn.execute("SELECT count(*) FROM idempotency_keys WHERE request_id = %s", (request.request_id,))
        assert claimed.fetchone() == (0,)  # nothing of the late command was committed
        assert conn.execute("SELECT stock FROM products WHERE sku = %s", (sku,)).fetchone() == (5,)
    retried = stack.commands.PlaceOrder(request, timeout=10)
    again = stack.commands.PlaceOrder(request, timeout=10)
    assert retried.order_id == again.order_id
    with psycopg.connect(libpq_url(url)) as conn:
        assert conn.execute("SELECT stock FROM products WHERE sku = %s", (sku,)).fetchone() == (3,)
