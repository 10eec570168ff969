"""WatchOrderSummaries: every change once and in order, and a resume that misses nothing."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest

from orders.v1 import commands_pb2, queries_pb2
from tests.support import Stack, add_product, new_id, new_sku, place

pytestmark = pytest.mark.e2e


class Watcher:
    """A watch stream read by a background thread into a queue."""

    def __init__(self, stack: Stack, request: queries_pb2.WatchOrderSummariesRequest) -> None:
        self.call = stack.queries.WatchOrderSummaries(request, timeout=60)
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
