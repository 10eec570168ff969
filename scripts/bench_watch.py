"""Watch fan-out latency: many concurrent WatchOrderSummaries streams while orders are placed and cancelled.

Usage: .venv/bin/python -m scripts.bench_watch [--watchers 500] [--rate 40] [--seconds 30] [--runs 3]

Starts its own local system (embedded PostgreSQL and NATS, durable settings, the three services), then
per run: opens --watchers streams (one customer each) from two client processes over 10 connections
each, waits until the query service reports them all open, and drives PlaceOrder (and CancelOrder for a
quarter of the orders) at --rate commands/s for those customers. A third process LISTENs on the
projector's change channel and stamps the moment each stream sequence's commit was announced. Reported:

- commit → watcher: from that announcement to the watcher receiving the change (what the watch adds);
- response → watcher: from the command's OK to the watcher receiving the change (end to end);
- missing and duplicated deliveries (every change of a watched order must arrive exactly once).

All timestamps are CLOCK_MONOTONIC, which every process on the machine shares.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import psycopg

from orders.db import libpq_url
from orders.read_model import CHANGES_CHANNEL
from orders.v1 import commands_pb2, commands_pb2_grpc, queries_pb2, queries_pb2_grpc
from scripts.bench_common import (
    LocalSystem,
    collect_results,
    exit_on_sigterm,
    local_system,
    machine,
    median,
    percentile,
    seed_products,
)
from tests.support import scrape_metrics

CONNECTIONS_PER_PROCESS = 10
Delivery = tuple[int, str, int, float]  # stream sequence, order id, version, received at


def watch_process(address: str, customers: list[str], stop: Any, results: Any) -> None:
    """Hold one watch stream per customer until stop is set; report every delivery."""

    async def run() -> list[Delivery]:
        received: list[Delivery] = []
        channels = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CONNECTIONS_PER_PROCESS)
        ]

        async def watch(stub: queries_pb2_grpc.QueryServiceStub, customer: str) -> None:
            async for message in stub.WatchOrderSummaries(queries_pb2.WatchOrderSummariesRequest(customer_id=customer)):
                summary = message.summary
                received.append((summary.stream_sequence, summary.order_id, summary.version, time.monotonic()))

        stubs = [queries_pb2_grpc.QueryServiceStub(channel) for channel in channels]
        tasks = [asyncio.create_task(watch(stubs[i % len(stubs)], c)) for i, c in enumerate(customers)]
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
        return received

    results.put(asyncio.run(run()))


def listen_process(read_url: str, ready: Any, stop: Any, results: Any) -> None:
    """Stamp when each stream sequence's projection commit is announced (NOTIFY arrives after commit)."""

    async def run() -> dict[int, float]:
        committed: dict[int, float] = {}
        async with await psycopg.AsyncConnection.connect(libpq_url(read_url), autocommit=True) as conn:
            await conn.execute(f"LISTEN {CHANGES_CHANNEL}")
            ready.set()
            while not stop.is_set():
                async for notify in conn.notifies(timeout=0.2):
                    now = time.monotonic()
                    for _kind, _key, _version, seq, _customer in json.loads(notify.payload):
                        committed.setdefault(seq, now)
        return committed

    results.put(asyncio.run(run()))


def drive(system: LocalSystem, customers: list[str], skus: list[str], rate: float, seconds: float) -> dict[str, Any]:
    """PlaceOrder (and CancelOrder for every 4th command) at rate commands/s from 8 threads."""
    responded: dict[tuple[str, int], float] = {}  # (order id, version) → when the OK arrived
    last_replies: list[tuple[str, str]] = []  # each thread's last (order id, consistency token)
    lock = threading.Lock()
    threads = 8
    interval = threads / rate
    started = time.monotonic()

    def command(
        stub: commands_pb2_grpc.CommandServiceStub, rng: random.Random, cancel: str | None
    ) -> tuple[str, int, str]:
        if cancel:
            request_id = str(uuid.uuid4())
            reply: Any = stub.CancelOrder(
                commands_pb2.CancelOrderRequest(request_id=request_id, order_id=cancel), timeout=10
            )
            return cancel, 2, reply.consistency_token
        line = commands_pb2.PlaceOrderLine(sku=rng.choice(skus), quantity=1)
        reply = stub.PlaceOrder(
            commands_pb2.PlaceOrderRequest(
                request_id=str(uuid.uuid4()), customer_id=rng.choice(customers), lines=[line]
            ),
            timeout=10,
        )
        return reply.order_id, 1, reply.consistency_token

    def worker(index: int) -> None:
        rng = random.Random(index)
        with grpc.insecure_channel(system.settings.command_addr) as channel:
            stub = commands_pb2_grpc.CommandServiceStub(channel)
            due, count, order_id, token = started + index * interval / threads, 0, "", ""
            while due < started + seconds:
                time.sleep(max(0.0, due - time.monotonic()))
                due += interval
                count += 1
                order_id, version, token = command(stub, rng, order_id if count % 4 == 0 else None)
                with lock:
                    responded[(order_id, version)] = time.monotonic()
            with lock:
                last_replies.append((order_id, token))

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.monotonic() - started
    with grpc.insecure_channel(system.settings.query_addr) as channel:  # wait until everything is projected
        stub = queries_pb2_grpc.QueryServiceStub(channel)
        for order_id, token in last_replies:
            stub.GetOrderSummary(
                queries_pb2.GetOrderSummaryRequest(order_id=order_id, consistency_token=token), timeout=60
            )
    return {"responded": responded, "commands_per_second": len(responded) / elapsed}


def run_once(
    system: LocalSystem, skus: list[str], watchers: int, rate: float, seconds: float, run: int
) -> dict[str, Any]:
    customers = [f"bw{run}-{i}" for i in range(watchers)]
    ctx = mp.get_context("spawn")
    stop, ready, results = ctx.Event(), ctx.Event(), ctx.Queue()
    halves = [customers[: watchers // 2], customers[watchers // 2 :]]
    procs = [ctx.Process(target=watch_process, args=(system.settings.query_addr, h, stop, results)) for h in halves]
    procs.append(ctx.Process(target=listen_process, args=(system.settings.read_database_url, ready, stop, results)))
    for proc in procs:
        proc.start()
    try:
        ready.wait(30)
        deadline = time.monotonic() + 60
        while scrape_metrics(system.settings.query_metrics_addr)["orders_query_watch_streams"] < watchers:
            if time.monotonic() > deadline:
                raise TimeoutError("the watch streams did not all open")
            time.sleep(0.1)
        load = drive(system, customers, skus, rate, seconds)
        time.sleep(1.0)  # changes committed last are still on their way to the watchers
        stop.set()
        outputs = collect_results(results, procs, timeout=60)
    finally:
        stop.set()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    committed: dict[int, float] = next(o for o in outputs if isinstance(o, dict))
    deliveries: list[Delivery] = [d for o in outputs if isinstance(o, list) for d in o]
    responded: dict[tuple[str, int], float] = load["responded"]
    seen = [(order_id, version) for _seq, order_id, version, _t in deliveries]
    after_commit = [t - committed[seq] for seq, _o, _v, t in deliveries if seq in committed]
    after_response = [t - responded[(o, v)] for _s, o, v, t in deliveries if (o, v) in responded]
    return {
        "commands_per_second": load["commands_per_second"],
        "changes_expected": len(responded),
        "delivered": len(deliveries),
        "missing": len(set(responded) - set(seen)),
        "duplicated": len(seen) - len(set(seen)),
        "commit_to_watcher_ms": {p: percentile(after_commit, p) * 1000 for p in (50, 95, 99, 100)},
        "response_to_watcher_ms": {p: percentile(after_response, p) * 1000 for p in (50, 95, 99, 100)},
    }


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watchers", type=int, default=500)
    parser.add_argument("--rate", type=float, default=40.0, help="commands per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp, local_system(Path(tmp)) as system:
        system.start("command_service", "projector", "query_service")
        skus = [f"BW-{i:03d}" for i in range(50)]
        seed_products(system, skus, stock=1_000_000)
        runs = []
        for run in range(args.runs):
            result = run_once(system, skus, args.watchers, args.rate, args.seconds, run)
            print(json.dumps(result), file=sys.stderr, flush=True)
            runs.append(result)
        description = machine()
    summary = {
        key: {p: median([r[key][p] for r in runs]) for p in (50, 95, 99, 100)}
        for key in ("commit_to_watcher_ms", "response_to_watcher_ms")
    }
    print(
        f"\n{args.watchers} watch streams, {median([r['commands_per_second'] for r in runs]):.0f} commands/s, "
        f"median of {args.runs} runs ({description['cores']} cores, {description['memory_gib']} GiB):\n"
    )
    print("| latency | p50 ms | p95 ms | p99 ms | max ms |\n|---|---|---|---|---|")
    for key, label in (
        ("commit_to_watcher_ms", "projection commit → watcher"),
        ("response_to_watcher_ms", "command OK → watcher"),
    ):
        print(f"| {label} | " + " | ".join(f"{summary[key][p]:.1f}" for p in (50, 95, 99, 100)) + " |")
    print(f"\nmissing deliveries: {sum(r['missing'] for r in runs)}, duplicated: {sum(r['duplicated'] for r in runs)}")
    print(json.dumps({"watchers": args.watchers, "runs": runs, "median": summary, "machine": description}))


if __name__ == "__main__":
    main()
