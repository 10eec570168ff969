"""Read-your-writes with consistency tokens, and search pages that stay stable while orders arrive."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest

from orders.v1 import queries_pb2
from tests.support import Stack, add_product, new_sku, place


def test_two_hundred_reads_right_after_writes_never_miss(stack: Stack) -> None:
    sku = new_sku("Y")
    add_product(stack.commands, sku, stock=100_000, name="Token lamp")
    for _ in range(200):
        placed = place(stack.commands, "ryw-200", (sku, 1))
        reply = stack.queries.GetOrderSummary(
            queries_pb2.GetOrderSummaryRequest(order_id=placed.order_id, consistency_token=placed.consistency_token),
            timeout=5,
        )
        assert (reply.summary.order_id, reply.summary.version) == (placed.order_id, 1)


def test_token_wait_fails_cleanly_within_the_deadline_when_the_projector_is_stopped(stack: Stack) -> None:
    sku = new_sku("Y")
    add_product(stack.commands, sku, stock=100_000, name="Stopped projector")
    stack.processes["projector"].stop()
    try:
        placed = place(stack.commands, "ryw-stopped", (sku, 1))
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as behind:
            stack.queries.GetOrderSummary(
                queries_pb2.GetOrderSummaryRequest(
                    order_id=placed.order_id, consistency_token=placed.consistency_token
                ),
                timeout=1.5,
            )
        elapsed = time.monotonic() - started
        assert behind.value.code() == grpc.StatusCode.UNAVAILABLE, behind.value.details()
        assert "behind" in (behind.value.details() or "")
        assert elapsed < 1.5 + 0.5  # answered by the server before the client's own deadline fired
        with pytest.raises(grpc.RpcError) as bad:
            stack.queries.GetOrderSummary(
                queries_pb2.GetOrderSummaryRequest(order_id=placed.order_id, consistency_token="not-a-token"), timeout=5
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stack.start("projector")
    reply = stack.queries.GetOrderSummary(
        queries_pb2.GetOrderSummaryRequest(order_id=placed.order_id, consistency_token=placed.consistency_token),
        timeout=10,
    )
    assert reply.summary.order_id == placed.order_id


def test_search_pages_stay_stable_while_orders_arrive(stack: Stack) -> None:
    word = f"zq{uuid.uuid4().hex[:6]}"
    sku = new_sku("Y")
    add_product(stack.commands, sku, stock=100_000, name=f"Widget {word}")
    first_batch = [place(stack.commands, f"searcher-{i}", (sku, 1)) for i in range(25)]
    last = first_batch[-1]
    stack.queries.GetOrderSummary(
        queries_pb2.GetOrderSummaryRequest(order_id=last.order_id, consistency_token=last.consistency_token), timeout=10
    )

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = stack.queries.SearchOrders(
            queries_pb2.SearchOrdersRequest(query=word, page_size=10, page_token=token), timeout=5
        )
        seen += [s.order_id for s in page.summaries]
        pages += 1
        if pages == 1:  # new matching orders arrive between pages
            newer = [place(stack.commands, "late-searcher", (sku, 1)) for _ in range(5)]
            stack.queries.GetOrderSummary(
                queries_pb2.GetOrderSummaryRequest(
                    order_id=newer[-1].order_id, consistency_token=newer[-1].consistency_token
                ),
                timeout=10,
            )
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(p.order_id for p in first_batch)  # each once, none skipped, no newcomer
    assert pages == 3

    with pytest.raises(grpc.RpcError) as foreign:
        stack.queries.SearchOrders(
            queries_pb2.SearchOrdersRequest(query="other words", page_token=page_token_of(stack, word)), timeout=5
        )
    assert foreign.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def page_token_of(stack: Stack, word: str) -> str:
    page = stack.queries.SearchOrders(queries_pb2.SearchOrdersRequest(query=word, page_size=1), timeout=5)
    assert page.next_page_token
    return page.next_page_token
