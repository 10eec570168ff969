"""WatchOrderSummaries: every change once and in order, and a resume that misses nothing."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from orders import local_stack
from orders.config import Settings
from orders.local_stack import ManagedProcess
from orders.v1 import commands_pb2, queries_pb2, queries_pb2_grpc
from tests.support import (
    Stack,
    add_product,
    eventually,
    new_id,
    new_sku,
    place,
    scrape_metrics,
    start_serving,
    stays,
)


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


SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16 * 1024)]


def own_query_service(stack: Stack, tmp_path: Path, **overrides: object) -> tuple[Settings, ManagedProcess]:
    """A query service of the test's own (on the session's databases), with settings changed."""
    settings = replace(stack.settings, **local_stack.free_addresses(), **overrides)  # type: ignore[arg-type]
    return settings, start_serving("query_service", settings, tmp_path)


def watch_count(settings: Settings) -> float:
    return scrape_metrics(settings.query_metrics_addr)["orders_query_watch_streams"]


def bulky_products(stack: Stack, count: int = 10) -> list[str]:
    """Products with long names: an order of one of each makes a change of about 2.4 KB on a watch."""
    skus = [new_sku("W") for _ in range(count)]
    for sku in skus:
        add_product(stack.commands, sku, stock=1000, name="Watched " + "x" * 190)
    return skus


def drain_until_cut_off(stalled: Iterator[queries_pb2.WatchOrderSummariesResponse]) -> tuple[list[str], int, str]:
    """Read what a cut-off stream still holds: (order ids, last stream sequence, the status details)."""
    delivered: list[str] = []
    last_seen = 0
    with pytest.raises(grpc.RpcError) as cut:
        for message in stalled:
            delivered.append(message.summary.order_id)
            last_seen = message.summary.stream_sequence
    assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, cut.value
    return delivered, last_seen, cut.value.details() or ""


def test_a_stalled_watcher_is_cut_off_in_time_although_nothing_else_changes(stack: Stack, tmp_path: Path) -> None:
    """A client that stops reading holds a blocked write; after ORDERS_WATCH_WRITE_TIMEOUT its stream ends.

    Two watchers of one customer on a query service of its own: one reads everything, the other stops
    after the snapshot (its client grants a 16 KB window, so the server's writes block once about 16 KB
    are in flight). After 40 orders (about 95 KB of changes) nothing changes any more, and the queue
    (1,000 changes) is far from full: only the time bound can end the stalled stream, and it does, while
    its client still is not reading. The client then finds the messages already in flight, followed by
    RESOURCE_EXHAUSTED, and resumes from the last sequence it saw without a gap. The reader is unaffected.
    """
    settings, server = own_query_service(stack, tmp_path, watch_write_timeout=2.0)
    skus, customer = bulky_products(stack), f"ws-{new_id()}"
    first = place(stack.commands, customer, *((sku, 1) for sku in skus))
    request = queries_pb2.WatchOrderSummariesRequest(
        customer_id=customer, include_snapshot=True, consistency_token=first.consistency_token
    )
    with (
        grpc.insecure_channel(settings.query_addr) as good,
        grpc.insecure_channel(settings.query_addr, options=SMALL_WINDOW) as slow,
    ):
        reader = Watcher(queries_pb2_grpc.QueryServiceStub(good), request)
        stalled = iter(queries_pb2_grpc.QueryServiceStub(slow).WatchOrderSummaries(request, timeout=120))
        try:
            assert next(stalled).summary.order_id == first.order_id
            assert reader.next().summary.order_id == first.order_id
            eventually(lambda: watch_count(settings) == 2, 10, "both watches open")
            orders = [first.order_id] + [
                place(stack.commands, customer, *((sku, 1) for sku in skus)).order_id for _ in range(40)
            ]
            assert [reader.next().summary.order_id for _ in orders[1:]] == orders[1:]  # all sent by now
            eventually(lambda: watch_count(settings) == 1, 30, "the stalled watch cut off, with no further change")

            delivered, last_seen, details = drain_until_cut_off(stalled)  # after the snapshot
            assert "after_sequence" in details and "a message waited 2s" in details, details
            assert 0 < len(delivered) < len(orders) - 1 and delivered == orders[1 : 1 + len(delivered)]
            resumed = Watcher(
                queries_pb2_grpc.QueryServiceStub(good),
                queries_pb2.WatchOrderSummariesRequest(customer_id=customer, after_sequence=last_seen),
            )
            missed = orders[1 + len(delivered) :]
            assert [resumed.next().summary.order_id for _ in missed] == missed
            resumed.close()
            # the reader's stream is still open (the resumed one's close reaches the server a moment later)
            eventually(lambda: watch_count(settings) == 1, 10, "only the reader's watch open")
        finally:
            reader.close()
            server.stop()


def test_a_stalled_watcher_is_cut_off_at_once_when_its_queue_overflows(stack: Stack, tmp_path: Path) -> None:
    """With a 4-change queue and a long write bound, changes arriving for a stalled client end its stream."""
    settings, server = own_query_service(stack, tmp_path, watch_queue_size=4, watch_write_timeout=300.0)
    skus, customer = bulky_products(stack), f"wq-{new_id()}"
    first = place(stack.commands, customer, *((sku, 1) for sku in skus))
    request = queries_pb2.WatchOrderSummariesRequest(
        customer_id=customer, include_snapshot=True, consistency_token=first.consistency_token
    )
    with grpc.insecure_channel(settings.query_addr, options=SMALL_WINDOW) as slow:
        stalled = iter(queries_pb2_grpc.QueryServiceStub(slow).WatchOrderSummaries(request, timeout=120))
        try:
            assert next(stalled).summary.order_id == first.order_id
            orders = [first.order_id]
            while watch_count(settings) == 1 and len(orders) < 300:
                orders.append(place(stack.commands, customer, *((sku, 1) for sku in skus)).order_id)
            assert len(orders) < 300, "the stalled watcher was never cut off"
            delivered, _, details = drain_until_cut_off(stalled)
            assert "more than 4 changes" in details and "after_sequence" in details, details
            assert delivered == orders[1 : 1 + len(delivered)]
        finally:
            server.stop()


FROZEN_CLIENT = """
import sys, grpc
from orders.v1 import queries_pb2, queries_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1])
stream = queries_pb2_grpc.QueryServiceStub(channel).WatchOrderSummaries(
    queries_pb2.WatchOrderSummariesRequest(customer_id=sys.argv[2], include_snapshot=True), timeout=120)
for message in stream:
    print(message.summary.order_id, flush=True)
"""


def test_an_idle_watcher_stays_open_and_a_frozen_client_is_disconnected(stack: Stack, tmp_path: Path) -> None:
    """Keepalive pings tell a quiet but healthy watcher from a client that no longer answers.

    With a 1 s write bound and keepalive pings every second, a watcher with nothing to receive stays
    open for many seconds and still gets the next change; a client process that is frozen (SIGSTOP)
    answers no ping, and the server drops its connection, and so its watch, within the keepalive timeout.
    """
    settings, server = own_query_service(
        stack, tmp_path, watch_write_timeout=1.0, keepalive_time=1.0, keepalive_timeout=2.0
    )
    sku = watched_product(stack)
    idle_customer, frozen_customer = f"wi-{new_id()}", f"wf-{new_id()}"
    first = place(stack.commands, idle_customer, (sku, 1))
    frozen_first = place(stack.commands, frozen_customer, (sku, 1))
    frozen = subprocess.Popen(
        [sys.executable, "-c", FROZEN_CLIENT, settings.query_addr, frozen_customer],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    with grpc.insecure_channel(settings.query_addr) as channel:
        idle = Watcher(
            queries_pb2_grpc.QueryServiceStub(channel),
            queries_pb2.WatchOrderSummariesRequest(
                customer_id=idle_customer, include_snapshot=True, consistency_token=first.consistency_token
            ),
        )
        try:
            assert idle.next().summary.order_id == first.order_id
            assert frozen.stdout is not None and frozen.stdout.readline().strip() == frozen_first.order_id
            eventually(lambda: watch_count(settings) == 2, 10, "both watches open")
            frozen.send_signal(signal.SIGSTOP)
            eventually(lambda: watch_count(settings) == 1, 20, "the frozen client's watch closed by keepalive")
            stays(lambda: watch_count(settings) == 1, 4.0, "the idle watch open")
            later = place(stack.commands, idle_customer, (sku, 1))
            assert idle.next().summary.order_id == later.order_id
        finally:
            idle.close()
            frozen.send_signal(signal.SIGCONT)
            local_stack.stop_process(frozen)
            server.stop()
