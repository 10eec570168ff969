"""WatchOrderSummaries: every change once and in order, and a resume that misses nothing."""

from __future__ import annotations

import queue
import threading
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from orders import local_stack
from orders.v1 import commands_pb2, queries_pb2, queries_pb2_grpc
from tests.support import Stack, add_product, eventually, new_id, new_sku, place, scrape_metrics, start_serving

pytestmark = pytest.mark.e2e


class Watcher:
    """A watch stream read by a background thread into a queue."""

    def __init__(
        self, stack: Stack | queries_pb2_grpc.QueryServiceStub, request: queries_pb2.WatchOrderSummariesRequest
    ) -> None:
        queries = stack.queries if isinstance(stack, Stack) else stack
        self.call = queries.WatchOrderSummaries(request, timeout=60)
        self.received: queue.Queue[queries_pb2.WatchOrderSummariesResponse | BaseException] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.received.put(message)
        except BaseException as exc:
            self.received.put(exc)

    def next(self) -> queries_pb2.WatchOrderSummariesResponse:
        item = self.received.get(timeout=10)
        assert not isinstance(item, BaseException), item
        return item

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)


def watched_product(stack: Stack) -> str:
    sku = new_sku("W")
    add_product(stack.commands, sku, stock=1000, name="Watched")
    return sku


def cancel(stack: Stack, order_id: str) -> commands_pb2.CancelOrderResponse:
    return stack.commands.CancelOrder(
        commands_pb2.CancelOrderRequest(request_id=new_id(), order_id=order_id), timeout=5
    )


def test_each_change_arrives_once_and_in_version_order(stack: Stack) -> None:
    sku, customer = watched_product(stack), f"wc-{new_id()}"
    first = place(stack.commands, customer, (sku, 1))
    watcher = Watcher(
        stack,
        queries_pb2.WatchOrderSummariesRequest(
            customer_id=customer, include_snapshot=True, consistency_token=first.consistency_token
        ),
    )
    try:
        snapshot = watcher.next()
        assert (snapshot.summary.order_id, snapshot.snapshot) == (first.order_id, True)
        orders = [place(stack.commands, customer, (sku, 1)) for _ in range(5)]
        for order in orders:  # placed and cancelled back to back: often projected in one batch
            cancel(stack, order.order_id)
        got = [watcher.next() for _ in range(10)]
        per_order: dict[str, list[int]] = {}
        for message in got:
            assert not message.snapshot
            per_order.setdefault(message.summary.order_id, []).append(message.summary.version)
        assert per_order == {o.order_id: [1, 2] for o in orders}
        sequences = [m.summary.stream_sequence for m in got]
        assert all(s > snapshot.summary.stream_sequence for s in sequences)
    finally:
        watcher.close()


def test_resume_from_a_sequence_delivers_exactly_what_was_missed(stack: Stack) -> None:
    sku, customer = watched_product(stack), f"wr-{new_id()}"
    a = place(stack.commands, customer, (sku, 1))
    watcher = Watcher(
        stack,
        queries_pb2.WatchOrderSummariesRequest(
            customer_id=customer, include_snapshot=True, consistency_token=a.consistency_token
        ),
    )
    last_seen = watcher.next().summary.stream_sequence
    watcher.close()

    cancel(stack, a.order_id)  # missed while disconnected
    b = place(stack.commands, customer, (sku, 1))
    resumed = Watcher(stack, queries_pb2.WatchOrderSummariesRequest(customer_id=customer, after_sequence=last_seen))
    try:
        missed = [resumed.next(), resumed.next()]
        assert [(m.summary.order_id, m.summary.version) for m in missed] == [(a.order_id, 2), (b.order_id, 1)]
        assert [m.summary.stream_sequence for m in missed] == sorted(m.summary.stream_sequence for m in missed)
        c = place(stack.commands, customer, (sku, 1))  # and then live changes, with nothing repeated
        live = resumed.next()
        assert (live.summary.order_id, live.summary.version) == (c.order_id, 1)
    finally:
        resumed.close()

    with pytest.raises(grpc.RpcError) as both:
        list(
            stack.queries.WatchOrderSummaries(
                queries_pb2.WatchOrderSummariesRequest(customer_id=customer, order_ids=[a.order_id]), timeout=5
            )
        )
    assert both.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_watcher_that_stops_reading_is_cut_off_and_can_resume(stack: Stack, tmp_path: Path) -> None:
    """The server holds at most a few changes for a stalled watcher, then ends its stream.

    A second query service with a 4-change queue serves two watchers of the same customer: one reads
    everything, the other stops after the snapshot (its client grants only a 16 KB window, so gRPC's
    flow control blocks the server's writes soon). The stalled stream is closed on the server while
    its client still is not reading; the client then finds the messages already in flight, followed
    by RESOURCE_EXHAUSTED, and resumes from the last sequence it saw without a gap.
    """
    settings = replace(stack.settings, **local_stack.free_addresses(), watch_queue_size=4)
    server = start_serving("query_service", settings, tmp_path)
    small_window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16 * 1024)]
    skus = [watched_product(stack) for _ in range(10)]
    customer = f"ws-{new_id()}"
    first = place(stack.commands, customer, *((sku, 1) for sku in skus))
    request = queries_pb2.WatchOrderSummariesRequest(
        customer_id=customer, include_snapshot=True, consistency_token=first.consistency_token
    )
    with (
        grpc.insecure_channel(settings.query_addr) as good,
        grpc.insecure_channel(settings.query_addr, options=small_window) as slow,
    ):
        reader = Watcher(queries_pb2_grpc.QueryServiceStub(good), request)
        stalled = iter(queries_pb2_grpc.QueryServiceStub(slow).WatchOrderSummaries(request, timeout=120))
        try:
            assert next(stalled).summary.order_id == first.order_id
            assert reader.next().summary.order_id == first.order_id
            eventually(lambda: scrape_metrics(settings.query_metrics_addr)["orders_query_watch_streams"] == 2)
            orders = [first.order_id]
            for _ in range(300):
                orders.append(place(stack.commands, customer, *((sku, 1) for sku in skus)).order_id)
                if scrape_metrics(settings.query_metrics_addr)["orders_query_watch_streams"] == 1:
                    break
            assert len(orders) < 300, "the stalled watcher was never cut off"
            assert [reader.next().summary.order_id for _ in orders[1:]] == orders[1:]  # the reader is unaffected

            delivered = [first.order_id]
            with pytest.raises(grpc.RpcError) as cut:
                for message in stalled:
                    delivered.append(message.summary.order_id)
                    last_seen = message.summary.stream_sequence
            assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "after_sequence" in (cut.value.details() or "")
            assert 1 < len(delivered) < len(orders) and delivered == orders[: len(delivered)]

            resumed = Watcher(
                queries_pb2_grpc.QueryServiceStub(good),
                queries_pb2.WatchOrderSummariesRequest(customer_id=customer, after_sequence=last_seen),
            )
            assert [resumed.next().summary.order_id for _ in orders[len(delivered) :]] == orders[len(delivered) :]
            resumed.close()
        finally:
            reader.close()
            server.stop()
