"""3,000 idle TCP connections and 200 watch streams whose clients never read, all at once, under load."""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

from orders import local_stack
from orders.v1 import queries_pb2, queries_pb2_grpc
from tests.fault import harness
from tests.support import Infra, eventually, isolated_settings, scrape_metrics

IDLE_CONNECTIONS = 3000
STALLED_WATCHES = 200
WRITE_TIMEOUT = 3.0

# 200 watch streams, 50 per connection (each channel its own), never read; each
# connection grants a 16 KB window, so the server's writes block soon. Prints "open" once all started.
STALLED_WATCHERS = """
import sys, time, grpc
from orders.v1 import queries_pb2, queries_pb2_grpc
address, customers, count = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16 * 1024)]
options.append(("grpc.use_local_subchannel_pool", 1))
channels = [grpc.insecure_channel(address, options=options) for _ in range(count // 50)]
calls = []
for n in range(count):
    stub = queries_pb2_grpc.QueryServiceStub(channels[n // 50])
    request = queries_pb2.WatchOrderSummariesRequest(customer_id=customers[n % len(customers)], include_snapshot=True)
    calls.append(stub.WatchOrderSummaries(request, timeout=600))
print("open", flush=True)
time.sleep(600)  # holds the streams open and reads nothing; the test ends this process
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def summary_latencies(address: str, order_ids: list[str]) -> list[float]:
    """Seconds per GetOrderSummary of a client that behaves, one call after the other."""
    seconds = []
    with grpc.insecure_channel(address) as channel:
        stub = queries_pb2_grpc.QueryServiceStub(channel)
        for order_id in order_ids:
            sent = time.monotonic()
            stub.GetOrderSummary(queries_pb2.GetOrderSummaryRequest(order_id=order_id), timeout=10)
            seconds.append(time.monotonic() - sent)
    return seconds


def test_idle_connections_and_stalled_watchers_cost_a_bounded_amount(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    """The servers keep answering others while 3,000 TCP connections sit idle (1,000 on each gRPC
    server) and 200 watchers never read; every stalled watch is cut off by the write bound, and the
    memory each costs is measured (printed, and in the README)."""
    started = time.monotonic()
    settings = isolated_settings(infra, nats_url=own_nats.url, watch_write_timeout=WRITE_TIMEOUT)
    with harness.loaded_system(settings, tmp_path, "i") as (system, client, load):
        query = system.start("query", "query_service")
        servers = {"command": settings.command_addr, "query": settings.query_addr, "projector": settings.admin_addr}
        sockets: list[socket.socket] = []
        watchers = None
        with load.running():
            harness.wait_for_commands(load, 200)
            orders = [c.order_id for c in client.ledger if c.kind == "place" and c.ok][:100]
            quiet = statistics.median(summary_latencies(settings.query_addr, orders))
            before = {name: rss_kib(system.processes[name].pid) for name in servers}
            try:
                for n in range(IDLE_CONNECTIONS):
                    host, _, port = list(servers.values())[n % len(servers)].rpartition(":")
                    sockets.append(socket.create_connection((host, int(port)), timeout=5))
                with_idle = {name: rss_kib(system.processes[name].pid) for name in servers}
                customers = ",".join(sorted({c.customer for c in client.ledger if c.kind == "place"}))
                watchers = subprocess.Popen(
                    [sys.executable, "-c", STALLED_WATCHERS, settings.query_addr, customers, str(STALLED_WATCHES)],
                    stdout=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
                assert watchers.stdout is not None and watchers.stdout.readline().strip() == "open"
                watches = lambda: scrape_metrics(settings.query_metrics_addr)["orders_query_watch_streams"]  # noqa: E731
                eventually(lambda: watches() == STALLED_WATCHES, 30, "all stalled watches open")
                with_watchers = rss_kib(query.pid)
                busy = summary_latencies(settings.query_addr, orders)
                for address in servers.values():
                    assert harness.health(address) == "SERVING"
                eventually(lambda: watches() == 0, 120, "every stalled watch cut off by the write bound")
            finally:
                if watchers is not None:
                    local_stack.stop_process(watchers)
                for sock in sockets:
                    sock.close()
            fault_end = time.monotonic()
            caught_up = harness.caught_up_after(settings, fault_end)
            harness.wait_for_commands(load, 100)
        harness.finish("3,000 idle connections + 200 stalled watches", system, client, caught_up, started)

    per_connection = {name: (with_idle[name] - before[name]) * 3 / IDLE_CONNECTIONS for name in servers}
    per_watch = (with_watchers - with_idle["query"]) / STALLED_WATCHES
    during = statistics.median(busy) * 1000
    print(
        f"KiB per idle connection: {per_connection}; KiB per stalled watch: {per_watch:.1f}; GetOrderSummary "
        f"median {quiet * 1000:.1f} ms before, {during:.1f} ms during, max {max(busy) * 1000:.0f} ms"
    )
    assert all(kib < 64 for kib in per_connection.values()), per_connection
    assert per_watch < 256, per_watch
    assert max(busy) < 2.0  # the others are still answered
