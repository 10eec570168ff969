"""The query side on 100,000 orders: every query served by an index, streams in bounded memory."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psycopg
import pytest
from google.protobuf import timestamp_pb2

from orders import local_stack
from orders.config import Settings
from orders.db import libpq_url
from orders.v1 import common_pb2, queries_pb2, queries_pb2_grpc
from tests.support import Infra, eventually, isolated_settings, migrate, start_serving, synthetic_read_model_sql

ORDERS = 100_000
LOAD = synthetic_read_model_sql(ORDERS)


@dataclass
class BigReadSide:
    settings: Settings
    pg: local_stack.LocalPostgres
    query: local_stack.ManagedProcess
    stub: queries_pb2_grpc.QueryServiceStub


@pytest.fixture(scope="module")
def big(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigReadSide]:
    work = tmp_path_factory.mktemp("big")
    pg = local_stack.start_postgres(
        work / "pg",
        durable=False,
        options={"shared_preload_libraries": "auto_explain", "auto_explain.log_min_duration": "0"},
    )
    settings = isolated_settings(  # DEBUG: the cancellation test reads the line a cancelled stream logs
        infra, read_database_url=pg.url("orders_read"), write_database_url=pg.url("w"), log_level="DEBUG"
    )
    asyncio.run(migrate(settings))
    with psycopg.connect(libpq_url(settings.read_database_url), autocommit=True) as conn:
        conn.execute(LOAD)
    query = start_serving("query_service", settings, work)
    channel = grpc.insecure_channel(settings.query_addr, options=[("grpc.max_receive_message_length", 8 << 20)])
    try:
        yield BigReadSide(settings, pg, query, queries_pb2_grpc.QueryServiceStub(channel))
    finally:
        channel.close()
        query.stop()
        pg.stop()


def ts(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def test_every_query_is_served_by_an_index(big: BigReadSide) -> None:
    log = big.pg.process.log_path
    start = log.stat().st_size
    q = big.stub
    some_order = str(uuid.UUID(hashlib.md5(b"1").hexdigest()))  # the LOAD's order 1
    now = datetime.now(UTC)
    filters = [
        queries_pb2.OrderFilter(),
        queries_pb2.OrderFilter(customer_id="customer-42"),
        queries_pb2.OrderFilter(status=common_pb2.ORDER_STATUS_CANCELLED),
        queries_pb2.OrderFilter(customer_id="customer-42", status=common_pb2.ORDER_STATUS_PLACED),
        queries_pb2.OrderFilter(placed_after=ts(now - timedelta(hours=30)), placed_before=ts(now - timedelta(hours=2))),
    ]
    q.GetOrderSummary(queries_pb2.GetOrderSummaryRequest(order_id=some_order), timeout=10)
    for filt, order in itertools.product(
        filters, (queries_pb2.SORT_ORDER_NEWEST_FIRST, queries_pb2.SORT_ORDER_OLDEST_FIRST)
    ):
        call = q.ListOrderSummaries(queries_pb2.ListOrderSummariesRequest(filter=filt, sort_order=order), timeout=30)
        list(itertools.islice(call, 1200))  # at least three keyset pages
        call.cancel()
    for text, filt in itertools.product(("", "g17", "SKU-17 gadget", "customer-42"), filters):
        page = q.SearchOrders(queries_pb2.SearchOrdersRequest(query=text, filter=filt, page_size=20), timeout=10)
        if page.next_page_token:
            q.SearchOrders(
                queries_pb2.SearchOrdersRequest(query=text, filter=filt, page_size=20, page_token=page.next_page_token),
                timeout=10,
            )
    q.ListProducts(queries_pb2.ListProductsRequest(in_stock_only=True, name_prefix="gadget g1"), timeout=10)
    for request in (
        queries_pb2.WatchOrderSummariesRequest(order_ids=[some_order], include_snapshot=True),
        queries_pb2.WatchOrderSummariesRequest(customer_id="customer-42", include_snapshot=True),
    ):
        call = q.WatchOrderSummaries(request, timeout=10)
        next(call)
        call.cancel()

    def plans() -> str:
        with open(log, errors="replace") as f:
            f.seek(start)
            return f.read()

    text = eventually(lambda: (t := plans()).count("on order_summaries") >= 40 and t, 10, "plans logged")
    scans = re.findall(r"Seq Scan on order_summaries.*", text)
    assert scans == [], (
        f"{len(scans)} sequential scans; first plan:\n{text[text.find('Seq Scan on order_summaries') - 2000 :][:2500]}"
    )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_streaming_100k_summaries_in_bounded_memory_and_cancel(big: BigReadSide) -> None:
    before = rss_kib(big.query.pid)
    count = sum(1 for _ in big.stub.ListOrderSummaries(queries_pb2.ListOrderSummariesRequest(), timeout=120))
    assert count == ORDERS
    grown = rss_kib(big.query.pid) - before
    assert grown < 64 * 1024, f"query service grew by {grown} KiB while streaming"  # ~200 MB were streamed

    call = big.stub.ListOrderSummaries(queries_pb2.ListOrderSummariesRequest(), timeout=120)
    assert len(list(itertools.islice(call, 10))) == 10
    call.cancel()
    line = eventually(
        lambda: re.search(r"cancelled by the client after (\d+) summaries", big.query.log_path.read_text()),
        10,
        "server noticed the cancellation",
    )
    assert int(line.group(1)) < ORDERS  # the server stopped early instead of streaming everything
