"""The query service SIGKILLed and restarted while 100 watch streams are open: each client resumes
from the stream sequence it saw last and misses no change, and sees none twice."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc
import psycopg

from orders import local_stack
from orders.config import Settings
from orders.db import libpq_url
from orders.v1 import queries_pb2, queries_pb2_grpc
from tests.fault import harness
from tests.support import Infra, eventually, isolated_settings

WATCHERS = 100
CHANNELS = 4  # 25 streams per connection, under ORDERS_MAX_WATCHES_PER_CONNECTION


class ResumingWatcher:
    """A client of WatchOrderSummaries for one customer that reconnects after UNAVAILABLE with
    after_sequence = the stream_sequence of the last message it received."""

    def __init__(self, stub: queries_pb2_grpc.QueryServiceStub, customer: str) -> None:
        self.stub, self.customer = stub, customer
        self.received: list[tuple[str, int]] = []  # (order id, version), in arrival order
        self.last_sequence = 0
        self.resumed_from: list[int] = []
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._call: grpc.Future | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _request(self) -> queries_pb2.WatchOrderSummariesRequest:
        if self.last_sequence:
            self.resumed_from.append(self.last_sequence)
            return queries_pb2.WatchOrderSummariesRequest(customer_id=self.customer, after_sequence=self.last_sequence)
        return queries_pb2.WatchOrderSummariesRequest(customer_id=self.customer, include_snapshot=True)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._call = call = self.stub.WatchOrderSummaries(self._request(), timeout=600)
            try:
                for message in call:
                    self.received.append((message.summary.order_id, message.summary.version))
                    self.last_sequence = message.summary.stream_sequence
            except grpc.RpcError as exc:
                if self._stopping.is_set():
                    return
                if exc.code() not in harness.RETRYABLE:
                    self.error = exc
                    return
                time.sleep(0.2)  # client back-off before reconnecting

    def stop(self) -> None:
        self._stopping.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(10)


def changes_in_write_model(settings: Settings) -> dict[str, set[tuple[str, int]]]:
    """Per customer, every (order, version) its orders went through: what a watcher must have seen."""
    with psycopg.connect(libpq_url(settings.write_database_url)) as conn:
        rows = conn.execute("SELECT customer_id, id::text, version FROM orders").fetchall()
    expected: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for customer, order_id, version in rows:
        expected[customer] |= {(order_id, v) for v in range(1, version + 1)}
    return expected


def all_delivered(watchers: list[ResumingWatcher], expected: dict[str, set[tuple[str, int]]]) -> bool:
    return all(len(w.received) >= len(expected.get(w.customer, ())) for w in watchers)


def test_watch_streams_resume_across_a_query_service_restart(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    started = time.monotonic()
    settings = isolated_settings(infra, nats_url=own_nats.url)
    client = harness.Client([settings.command_addr])
    channels = [grpc.insecure_channel(settings.query_addr, options=harness.CHANNEL_OPTIONS) for _ in range(CHANNELS)]
    customers = [f"w{i}" for i in range(WATCHERS)]
    watchers: list[ResumingWatcher] = []
    with harness.system(settings, tmp_path) as system, contextlib.closing(client):
        try:
            system.start("command", "command_service")
            system.start("projector", "projector")
            system.start("query", "query_service")
            skus = system.seed_catalog(client)
            stubs = [queries_pb2_grpc.QueryServiceStub(c) for c in channels]
            watchers = [ResumingWatcher(stubs[i % CHANNELS], c) for i, c in enumerate(customers)]
            metrics = f"http://{settings.query_metrics_addr}/metrics"
            eventually(lambda: f"orders_query_watch_streams {WATCHERS}.0" in harness.fetch(metrics), 30, "watches open")
            load = harness.Load(client, skus, customers)
            with load.running():
                eventually(lambda: all(w.last_sequence for w in watchers), 60, "every watcher receiving changes")
                system.restart_killed("query")
                fault_end = time.monotonic()
                caught_up = harness.caught_up_after(settings, fault_end)
                harness.wait_for_commands(load, 200)
            harness.finish("query service restart, 100 watches", system, client, caught_up, started)

            expected = changes_in_write_model(settings)
            eventually(lambda: all_delivered(watchers, expected), 60, "every change delivered to its watcher")
            for watcher in watchers:
                assert watcher.error is None, watcher.error
                assert len(watcher.received) == len(set(watcher.received)), f"{watcher.customer}: a change twice"
                assert set(watcher.received) == expected[watcher.customer], f"{watcher.customer}: changes missed"
                assert watcher.resumed_from, f"{watcher.customer} never reconnected"
        finally:
            for watcher in watchers:
                watcher.stop()
            for channel in channels:
                channel.close()
