"""Read scale-out: GetOrderSummary through 1, 2 and 3 query services (one on the read primary, the others
on streaming replicas of it), the CPU per call, and the replica visibility delay: from a command's OK
to the answer of a read with its consistency token through a replica's query service (and, for
comparison, through the primary's).

Usage: .venv/bin/python -m scripts.bench_replicas [--runs 3] [--seconds 10] [--orders 5000] [--reads 300]

Starts its own PostgreSQL (durable settings, as `orders up`), two replicas made with pg_basebackup,
NATS, the command service, the projector and three query services (one worker each), places --orders
orders, then per run: the query load from two client processes (16 calls in flight in all, spread
evenly over the query services in use), and --reads commands each followed at once by a token read.
Prints a Markdown table (medians over the runs) and a JSON line with the machine's description.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psycopg

from orders import local_stack
from orders.config import Settings
from orders.db import libpq_url
from orders.v1 import commands_pb2, commands_pb2_grpc, queries_pb2, queries_pb2_grpc
from scripts.bench_common import (
    LocalSystem,
    collect_results,
    cpu_seconds,
    exit_on_sigterm,
    local_system,
    machine,
    median,
    percentile,
    seed_products,
    with_children,
)
from tests.support import new_id, start_serving

CONCURRENCY = 16
CLIENT_PROCESSES = 2
SKUS = [f"RB-{n}" for n in range(20)]


def query_client(job: dict[str, Any], results: Any) -> None:
    """GetOrderSummary calls for job["seconds"], callers spread round-robin over job["addresses"]."""

    async def run() -> dict[str, Any]:
        rng = random.Random(job["seed"])
        channels = [grpc.aio.insecure_channel(address) for address in job["addresses"]]
        stubs = [queries_pb2_grpc.QueryServiceStub(channel) for channel in channels]
        calls = 0
        started = time.monotonic()
        deadline = started + job["seconds"]

        async def caller(stub: queries_pb2_grpc.QueryServiceStub) -> None:
            nonlocal calls
            while time.monotonic() < deadline:
                request = queries_pb2.GetOrderSummaryRequest(order_id=rng.choice(job["order_ids"]))
                await stub.GetOrderSummary(request, timeout=10)
                calls += 1

        await asyncio.gather(*(caller(stubs[n % len(stubs)]) for n in range(job["concurrency"])))
        for channel in channels:
            await channel.close()
        return {"calls": calls, "seconds": time.monotonic() - started}

    results.put(asyncio.run(run()))


def place_orders(settings: Settings, count: int) -> list[str]:
    """count orders placed through the command service, 16 at a time; their ids."""

    async def run() -> list[str]:
        placed: list[str] = []
        async with grpc.aio.insecure_channel(settings.command_addr) as channel:
            stub = commands_pb2_grpc.CommandServiceStub(channel)

            async def caller(n: int) -> None:
                for i in range(n, count, CONCURRENCY):
                    line = commands_pb2.PlaceOrderLine(sku=SKUS[i % len(SKUS)], quantity=1)
                    customer = f"c{i % 500}"
                    request = commands_pb2.PlaceOrderRequest(request_id=new_id(), customer_id=customer, lines=[line])
                    placed.append((await stub.PlaceOrder(request, timeout=30)).order_id)

            await asyncio.gather(*(caller(n) for n in range(CONCURRENCY)))
        return placed

    return asyncio.run(run())


def query_cpu(system: LocalSystem, pids: list[int]) -> float:
    """CPU seconds so far of the query services and of every PostgreSQL server (their backends included)."""
    servers = [pid for name, pid in system.infra_pids.items() if name.startswith("postgres")]
    return sum(cpu_seconds(p) for pid in pids for p in with_children(pid)) + sum(
        cpu_seconds(p) for pid in servers for p in with_children(pid)
    )


def throughput(system: LocalSystem, nodes: list[tuple[Settings, int]], order_ids: list[str], seconds: float) -> dict:  # type: ignore[type-arg]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    jobs = [
        {
            "addresses": [settings.query_addr for settings, _ in nodes],
            "concurrency": CONCURRENCY // CLIENT_PROCESSES,
            "seconds": seconds,
            "order_ids": order_ids,
            "seed": n,
        }
        for n in range(CLIENT_PROCESSES)
    ]
    procs = [ctx.Process(target=query_client, args=(job, results)) for job in jobs]
    cpu_before = query_cpu(system, [pid for _, pid in nodes])
    for proc in procs:
        proc.start()
    outs = collect_results(results, procs, timeout=seconds + 120)
    cpu_used = query_cpu(system, [pid for _, pid in nodes]) - cpu_before
    calls = sum(out["calls"] for out in outs)
    return {
        "per_second": calls / max(out["seconds"] for out in outs),
        "cpu_ms_per_call": cpu_used / max(calls, 1) * 1000,
    }


def visibility(settings: Settings, query: Settings, reads: int) -> dict[str, float]:
    """Milliseconds from PlaceOrder's OK to the answer of a read with its token through query's service."""
    delays = []
    with (
        grpc.insecure_channel(settings.command_addr) as commands_channel,
        grpc.insecure_channel(query.query_addr) as query_channel,
    ):
        commands = commands_pb2_grpc.CommandServiceStub(commands_channel)
        queries = queries_pb2_grpc.QueryServiceStub(query_channel)
        for i in range(reads):
            line = commands_pb2.PlaceOrderLine(sku=SKUS[i % len(SKUS)], quantity=1)
            placed = commands.PlaceOrder(
                commands_pb2.PlaceOrderRequest(request_id=new_id(), customer_id="visibility", lines=[line]), timeout=30
            )
            ok = time.perf_counter()
            token = placed.consistency_token
            queries.GetOrderSummary(
                queries_pb2.GetOrderSummaryRequest(order_id=placed.order_id, consistency_token=token), timeout=30
            )
            delays.append((time.perf_counter() - ok) * 1000)
    return {"p50_ms": percentile(delays, 50), "p99_ms": percentile(delays, 99)}


def wait_replayed(primary: str, replicas: list[str], timeout: float = 120) -> None:
    with psycopg.connect(primary, autocommit=True) as conn:
        target = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()

    def caught_up(url: str) -> bool:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", target).fetchone()
            return bool(row and row[0])

    local_stack.wait_until(lambda: all(caught_up(url) for url in replicas), timeout, "the replicas to catch up")


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--orders", type=int, default=5000)
    parser.add_argument("--reads", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp, local_system(Path(tmp)) as system:
        work, primary = Path(tmp), system.postgres
        assert primary is not None
        replicas = [local_stack.start_replica(primary, work / f"replica{n}") for n in (1, 2)]
        try:
            for n, replica in enumerate(replicas, 1):
                system.infra_pids[f"postgres-replica{n}"] = replica.process.pid
            system.start("command_service", "projector")
            seed_products(system, SKUS, stock=10_000_000)
            order_ids = place_orders(system.settings, args.orders)
            nodes: list[tuple[Settings, int]] = []
            for n, server in enumerate([primary, *replicas]):
                own = Settings(
                    **{
                        **system.settings.__dict__,
                        "query_database_url": server.url("bench_read"),
                        "query_addr": f"127.0.0.1:{local_stack.free_port()}",
                        "query_metrics_addr": f"127.0.0.1:{local_stack.free_port()}",
                    }
                )
                proc = start_serving("query_service", own, work / f"logs-query{n}")
                system.processes.append(proc)
                nodes.append((own, proc.pid))
            wait_replayed(libpq_url(primary.url("bench_read")), [libpq_url(r.url("bench_read")) for r in replicas])
            runs = []
            for run in range(args.runs):
                result: dict[str, Any] = {}
                for count in (1, 2, 3):
                    result[f"get_{count}"] = throughput(system, nodes[:count], order_ids, args.seconds)
                    print(f"run {run + 1}: {count} query services: {result[f'get_{count}']}", file=sys.stderr)
                result["visibility_primary"] = visibility(system.settings, nodes[0][0], args.reads)
                result["visibility_replica"] = visibility(system.settings, nodes[1][0], args.reads)
                print(f"run {run + 1}: visibility {result['visibility_primary']} / {result['visibility_replica']}")
                runs.append(result)
        finally:
            for replica in replicas:
                replica.stop()
    report(runs)


def report(runs: list[dict[str, Any]]) -> None:
    def med(key: str, stat: str) -> float:
        return median([run[key][stat] for run in runs])

    print(f"\nMedians of {len(runs)} runs.\n")
    print("| query services | GetOrderSummary/s | vs 1 | CPU per call (query services + PostgreSQL) |")
    print("|---|---|---|---|")
    one = med("get_1", "per_second")
    for count, label in ((1, "1 (primary)"), (2, "2 (primary + 1 replica)"), (3, "3 (primary + 2 replicas)")):
        rate = med(f"get_{count}", "per_second")
        print(f"| {label} | {rate:,.0f} | {rate / one:.2f} | {med(f'get_{count}', 'cpu_ms_per_call'):.2f} ms |")
    print("\n| token read after the command's OK | p50 | p99 |\n|---|---|---|")
    paths = (
        ("visibility_primary", "through the primary's query service"),
        ("visibility_replica", "through a replica's"),
    )
    for key, label in paths:
        print(f"| {label} | {med(key, 'p50_ms'):.1f} ms | {med(key, 'p99_ms'):.1f} ms |")
    print(json.dumps({"machine": machine(), "runs": runs}))


if __name__ == "__main__":
    main()
