"""The benchmark: every figure next to the raw building block doing the same work, in the same run.

Usage: .venv/bin/python -m scripts.bench [--concurrency 16] [--seconds 20] [--runs 3] [--backlog 100000]
                                         [--read-orders 100000] [--out bench-results] [--given]

Starts its own local system (embedded PostgreSQL with fsync on, nats-server with fsync before every ack,
the three services), or with --given measures the system the ORDERS_* variables point at (then the
backlog drain is skipped, because it stops the projector, and the queries use that read model), then
per run:

1. raw SQL: the PlaceOrder transaction (order, 3 items, 3 conditional stock updates, outbox row) issued
   directly with psycopg at --concurrency, on a database of its own;
2. commands at full speed: PlaceOrder, with CancelOrder and UpdateInventory at --cancel-share and
   --inventory-share, over gRPC from --clients client processes at --concurrency, while the projector's
   lag is sampled and the CPU time every process used is counted (where the time goes); then again
   paced at half the rate reached, measuring visibility (command OK → the order readable through a
   token-guarded GetOrderSummary, every 5th order);
3. the projector draining a --backlog of events, next to a plain JetStream pull consumer (fetch + ack)
   reading the same events, and JetStream publishes of the same events: 256 awaiting their acks at a
   time, and atomic batches of 256 one after another (how the relay publishes under load);
4. queries on a read model of --read-orders orders: GetOrderSummary at 16 concurrent callers,
   SearchOrders, and ListOrderSummaries streams of 10,000 rows, next to a no-op grpc.aio unary call
   from the same clients (the framework's own floor).

Writes <out>/bench.json (every figure, per run and median, with the machine), <out>/bench.md (the
table) and <out>/bench.png (latency percentiles and projector lag over time; needs matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
from nats.aio.client import Client as NATS

from orders import jetstream, local_stack, security
from orders.config import Settings
from orders.db import ensure_database, libpq_url
from orders.events import PRODUCT, EventContext, build_event
from orders.migrations import WRITE, upgrade
from orders.v1 import (
    commands_pb2,
    commands_pb2_grpc,
    common_pb2,
    events_pb2,
    queries_pb2,
    queries_pb2_grpc,
)
from projector import lag
from scripts.bench_common import (
    LocalSystem,
    collect_results,
    cpu_by_component,
    cpu_seconds,
    exit_on_sigterm,
    gather_results,
    local_system,
    machine,
    median,
    percentile,
    seed_products,
    with_children,
)
from tests.support import (
    publish_events,
    scrape_metrics,
    synthetic_history,
    synthetic_read_model_sql,
)

SKUS = [f"BENCH-{i:03d}" for i in range(200)]
PCTS = (50, 95, 99)


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    return {"per_second": len(latencies) / seconds, **{f"p{p}_ms": percentile(latencies, p) * 1000 for p in PCTS}}


# --- 1. raw SQL ---------------------------------------------------------------------------------


async def raw_sql(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    """The PlaceOrder transaction's 8 statements, straight through psycopg, at the same concurrency."""
    await ensure_database(url)
    await asyncio.to_thread(upgrade, url, WRITE)
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO products (sku, name, unit_price_minor, currency, stock, version) "
            "SELECT unnest(%s::text[]), 'raw', 100, 'EUR', 1000000000, 1 ON CONFLICT DO NOTHING",
            (SKUS,),
        )
    conns = [await psycopg.AsyncConnection.connect(libpq_url(url)) for _ in range(concurrency)]
    backends = [conn.info.backend_pid for conn in conns]  # PostgreSQL's processes serving these callers
    latencies: list[float] = []

    async def worker(conn: psycopg.AsyncConnection[Any], seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            started = time.perf_counter()
            order_id, skus = str(uuid.uuid4()), sorted(rng.sample(SKUS, 3))
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO orders (id, customer_id, status, total_minor, currency, version, created_at,"
                    " updated_at) VALUES (%s, 'raw', 'PLACED', 300, 'EUR', 1, now(), now())",
                    (order_id,),
                )
                for line, sku in enumerate(skus):
                    await conn.execute(
                        "INSERT INTO order_items (order_id, line_no, sku, name, quantity, unit_price_minor)"
                        " VALUES (%s, %s, %s, 'raw', 1, 100)",
                        (order_id, line, sku),
                    )
                for sku in skus:
                    await conn.execute(
                        "UPDATE products SET stock = stock - 1, version = version + 1 WHERE sku = %s AND stock >= 1",
                        (sku,),
                    )
                await conn.execute(
                    "INSERT INTO outbox (event_id, subject, headers, payload) VALUES (%s, 'raw', '{}', %s)",
                    (str(uuid.uuid4()), b"x" * 300),
                )
            latencies.append(time.perf_counter() - started)

    try:
        cpu_before = time.process_time() + sum(cpu_seconds(pid) for pid in backends)
        started = time.monotonic()
        await asyncio.gather(*(worker(conn, i, started + seconds) for i, conn in enumerate(conns)))
        elapsed = time.monotonic() - started
        cpu_used = time.process_time() + sum(cpu_seconds(pid) for pid in backends) - cpu_before
    finally:
        for conn in conns:
            await conn.close()
    # CPU of the client (this process) and of the PostgreSQL backends that served it, per transaction
    return {**summary(latencies, elapsed), "cpu_ms_per_tx": cpu_used / max(len(latencies), 1) * 1000}


# --- 2. commands over gRPC ------------------------------------------------------------------------


def load_process(job: dict[str, Any], results: Any) -> None:
    """One client process: `concurrency` async callers for `seconds`, closed loop or paced at `rate`."""

    async def run() -> dict[str, Any]:
        rng = random.Random(job["seed"])
        latencies: dict[str, list[float]] = {"PlaceOrder": [], "CancelOrder": [], "UpdateInventory": []}
        visibility: list[float] = []
        failures: dict[str, int] = {}
        placed: list[str] = []
        load_started, cpu_started = time.monotonic(), time.process_time()  # after the imports
        deadline = load_started + job["seconds"]
        settings = Settings(**job["settings"])
        md = security.call_metadata(settings)
        # Connections of their own (the kernel hands each to one worker of a service): `channels` per process.
        channels = [
            security.client_channel(settings.command_addr, settings, aio=True, own_connection=True)
            for _ in range(job["channels"])
        ]
        async with (
            contextlib.AsyncExitStack() as stack,
            security.client_channel(settings.query_addr, settings, aio=True) as qc,
        ):
            for channel in channels:
                await stack.enter_async_context(channel)
            stubs = [commands_pb2_grpc.CommandServiceStub(channel) for channel in channels]
            queries = queries_pb2_grpc.QueryServiceStub(qc)

            async def one(kind: str, commands: Any) -> Any:
                if kind == "CancelOrder" and placed:
                    order_id = placed.pop(rng.randrange(len(placed)))
                    return await commands.CancelOrder(
                        commands_pb2.CancelOrderRequest(request_id=str(uuid.uuid4()), order_id=order_id),
                        timeout=10,
                        metadata=md,
                    )
                if kind == "UpdateInventory":
                    return await commands.UpdateInventory(
                        commands_pb2.UpdateInventoryRequest(
                            request_id=str(uuid.uuid4()), sku=rng.choice(SKUS), delta=5
                        ),
                        timeout=10,
                        metadata=md,
                    )
                lines = [commands_pb2.PlaceOrderLine(sku=s, quantity=1) for s in rng.sample(SKUS, rng.randint(1, 3))]
                request = commands_pb2.PlaceOrderRequest(
                    request_id=str(uuid.uuid4()), customer_id=f"bench-{rng.randrange(1000)}", lines=lines
                )
                return await commands.PlaceOrder(request, timeout=10, metadata=md)

            async def caller(index: int) -> None:
                count = 0
                interval = job["concurrency"] / job["rate"] if job["rate"] else 0.0
                next_at = time.monotonic() + index * interval / job["concurrency"]
                while time.monotonic() < deadline:
                    if interval:
                        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                        next_at += interval
                    roll = rng.random()
                    kind = (
                        "CancelOrder"
                        if roll < job["cancel_share"]
                        else "UpdateInventory"
                        if roll < job["cancel_share"] + job["inventory_share"]
                        else "PlaceOrder"
                    )
                    kind = kind if kind != "CancelOrder" or placed else "PlaceOrder"
                    started = time.perf_counter()
                    try:
                        reply = await one(kind, stubs[index % len(stubs)])
                    except grpc.aio.AioRpcError as err:
                        failures[f"{kind} {err.code().name}"] = failures.get(f"{kind} {err.code().name}", 0) + 1
                        continue
                    answered = time.perf_counter()
                    latencies[kind].append(answered - started)
                    if kind == "PlaceOrder":
                        placed.append(reply.order_id)
                        count += 1
                        if job["visibility"] and count % 5 == 0:
                            await queries.GetOrderSummary(
                                queries_pb2.GetOrderSummaryRequest(
                                    order_id=reply.order_id, consistency_token=reply.consistency_token
                                ),
                                timeout=10,
                                metadata=md,
                            )
                            visibility.append(time.perf_counter() - answered)

            await asyncio.gather(*(caller(i) for i in range(job["concurrency"])))
        return {
            "latencies": latencies,
            "visibility": visibility,
            "failures": failures,
            "cpu_seconds": time.process_time() - cpu_started,
            "seconds": time.monotonic() - load_started,
        }

    results.put(asyncio.run(run()))


def drive(system: LocalSystem, args: argparse.Namespace, rate: float, visibility: bool, run: int) -> dict[str, Any]:
    """Commands from args.clients processes; the projector's lag sampled meanwhile."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    per_client = max(1, args.concurrency // args.clients)
    command_addrs = system.command_addrs or [system.settings.command_addr]
    jobs = [
        {
            "settings": {**system.settings.__dict__, "command_addr": command_addrs[i % len(command_addrs)]},
            "concurrency": per_client,
            "channels": args.channels,
            "seconds": args.seconds,
            "rate": rate / args.clients,
            "cancel_share": args.cancel_share,
            "inventory_share": args.inventory_share,
            "visibility": visibility,
            "seed": run * 100 + i,
        }
        for i in range(args.clients)
    ]
    procs = [ctx.Process(target=load_process, args=(job, results)) for job in jobs]
    groups_before = place_order_groups(system)
    cpu_before = cpu_by_component(system)
    started = time.monotonic()
    for proc in procs:
        proc.start()
    outputs: list[dict[str, Any]] = []
    lags, memory = asyncio.run(
        sample_while(system, started, lambda: gather_results(results, procs, outputs))  # read as they run
    )
    cpu_after = cpu_by_component(system)
    groups = [after - before for after, before in zip(place_order_groups(system), groups_before, strict=True)]
    for proc in procs:
        proc.join(30)
    elapsed = max(out["seconds"] for out in outputs)  # the load's span (process start-up excluded)
    merged: dict[str, list[float]] = {}
    for out in outputs:
        for kind, values in out["latencies"].items():
            merged.setdefault(kind, []).extend(values)
    failures: dict[str, int] = {}
    for out in outputs:
        for key, n in out["failures"].items():
            failures[key] = failures.get(key, 0) + n
    total = sum(len(v) for v in merged.values())
    cpu_used = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    cpu_used["clients"] = sum(out["cpu_seconds"] for out in outputs)
    return {
        "commands_per_second": total / elapsed,
        # where the time goes: CPU milliseconds per successful command, by process, until the lag was 0
        "cpu_ms_per_command": {name: seconds / max(total, 1) * 1000 for name, seconds in cpu_used.items()},
        "by_rpc": {kind: summary(values, elapsed) for kind, values in merged.items() if values},
        "visibility_ms": {f"p{p}": percentile([v for o in outputs for v in o["visibility"]], p) * 1000 for p in PCTS},
        "failures": failures,
        # group commit: PlaceOrders per transaction (0 when the command service does not export it)
        "place_orders_per_transaction": groups[0] / groups[1] if groups[1] else 0.0,
        "lag": lags,
        "max_rss_mb": memory,
    }


def place_order_groups(system: LocalSystem) -> tuple[float, float]:
    """(PlaceOrders, transactions) the command service has committed them in so far, from its metrics."""
    try:
        scraped = scrape_metrics(system.settings.command_metrics_addr)
    except OSError:  # a system measured with --given may not expose its metrics here
        return 0.0, 0.0
    return scraped.get("orders_command_group_size_sum", 0.0), scraped.get("orders_command_group_size_count", 0.0)


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def sample_while(
    system: LocalSystem, started: float, done: Callable[[], bool]
) -> tuple[list[tuple[float, int]], dict[str, float]]:
    """Every 0.5 s until done(): the projection lag in events, and each service's resident memory; then
    the lag until the projector has caught up."""
    nc = await jetstream.connect(system.settings, "bench-lag", retry_forever=False)
    lags: list[tuple[float, int]] = []
    memory: dict[str, float] = {}
    try:
        while not done():
            lags.append((time.monotonic() - started, (await lag.measure(nc, system.settings)).events))
            for proc in system.processes:  # per process: the supervisor or any one of its workers
                memory[proc.name] = max(memory.get(proc.name, 0.0), *map(rss_mb, with_children(proc.pid)))
            await asyncio.sleep(0.5)
        await lag_until_caught_up(nc, system.settings, started, lags)  # the tail after the load stopped
    finally:
        await jetstream.close(nc)
    return lags, memory


async def lag_until_caught_up(nc: Any, settings: Settings, started: float, lags: list[tuple[float, int]]) -> None:
    """Append (seconds since started, events behind) every 0.5 s until the projector has caught up."""
    while True:
        behind = (await lag.measure(nc, settings)).events
        lags.append((time.monotonic() - started, behind))
        if behind == 0:
            return
        await asyncio.sleep(0.5)


# --- 3. projector backlog, next to raw JetStream ---------------------------------------------------


async def raw_jetstream(system: LocalSystem, count: int) -> dict[str, float]:
    """Publish `count` events with 256 acks in flight, and again as atomic batches (as the relay does), then
    read them with a pull consumer."""
    meta = EventContext(occurred_at=datetime.now(UTC), correlation_id=str(uuid.uuid4()), causation_id="bench")
    upserted = events_pb2.ProductUpserted(name="raw", unit_price=common_pb2.Money(currency_code="EUR", minor_units=1))
    event = build_event(meta, PRODUCT, "RAW-1", 1, product_upserted=upserted)
    nc = await jetstream.connect(system.settings, "bench-raw", retry_forever=False)
    try:
        js = nc.jetstream(timeout=30)
        stream = "BENCH_RAW"
        await js.add_stream(name=stream, subjects=["bench.raw.>"])
        started = time.monotonic()
        in_flight = asyncio.Semaphore(256)

        async def publish(i: int) -> None:
            async with in_flight:
                await js.publish(f"bench.raw.{i % 1000}", event.payload, headers={"Nats-Msg-Id": str(uuid.uuid4())})

        await asyncio.gather(*(publish(i) for i in range(count)))
        publish_rate = count / (time.monotonic() - started)
        atomic_rate = await raw_atomic_batches(nc, event.payload, count)
        sub = await js.pull_subscribe("bench.raw.>", durable="raw", stream=stream)
        started, seen = time.monotonic(), 0
        while seen < count:
            msgs = await sub.fetch(256, timeout=5)
            for msg in msgs:
                await msg.ack()
            seen += len(msgs)
        consume_rate = count / (time.monotonic() - started)
        await js.delete_stream(stream)
    finally:
        await jetstream.close(nc)
    return {
        "publish_per_second": publish_rate,
        "atomic_publish_per_second": atomic_rate,
        "consume_per_second": consume_rate,
    }


async def raw_atomic_batches(nc: NATS, payload: bytes, count: int) -> float:
    """Publish `count` events as atomic batches of 256, one after the other, as the relay does; events/s."""
    stream = "BENCH_RAW_ATOMIC"
    await nc.jsm().add_stream(name=stream, subjects=["bench.atomic.>"], allow_atomic=True)
    try:
        started = time.monotonic()
        for first in range(0, count, 256):
            batch = [
                (f"bench.atomic.{i % 1000}", payload, {"Nats-Msg-Id": str(uuid.uuid4())})
                for i in range(first, min(first + 256, count))
            ]
            ack = await jetstream.publish_atomic_batch(nc, batch, timeout=30)
            assert "error" not in ack, ack
        return count / (time.monotonic() - started)
    finally:
        await nc.jsm().delete_stream(stream)


def drain(system: LocalSystem, backlog: int, run: int) -> dict[str, Any]:
    """Stop the projector, publish a backlog of synthetic events, start it, time it until caught up."""
    system.stop("projector")
    history = synthetic_history(backlog, backlog // 10, 200, seed=run, prefix=f"D{run}x{uuid.uuid4().hex[:4]}")
    asyncio.run(publish_events(system.settings, history.events))
    started = time.monotonic()
    system.start("projector")
    nc_lags: list[tuple[float, int]] = []

    async def wait() -> None:
        nc = await jetstream.connect(system.settings, "bench-drain", retry_forever=False)
        try:
            await lag_until_caught_up(nc, system.settings, started, nc_lags)
        finally:
            await jetstream.close(nc)

    asyncio.run(wait())
    seconds = time.monotonic() - started
    return {
        "events": len(history.events),
        "seconds": seconds,
        "per_second": len(history.events) / seconds,
        "lag": nc_lags,
    }


# --- 4. queries, next to a no-op gRPC call ---------------------------------------------------------

NOOP_METHOD = "/bench.NoOp/Call"
NOOP_REPLY = b"x" * 400  # about the size of a GetOrderSummaryResponse with three lines


def noop_server(port: int, ready: Any) -> None:
    """A grpc.aio server whose one method answers a fixed reply: the floor under any unary query."""

    async def serve() -> None:
        async def call(request: bytes, context: Any) -> bytes:
            return NOOP_REPLY

        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(call)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.NoOp", {"Call": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(serve())


def query_process(job: dict[str, Any], results: Any) -> None:
    async def run() -> dict[str, Any]:
        rng = random.Random(job["seed"])
        kind, order_ids = job["kind"], job["order_ids"]
        out: list[float] = []
        rows = 0  # summaries received from list streams
        load_started = time.monotonic()
        deadline = load_started + job["seconds"]
        settings = Settings(**job["settings"])
        md = security.call_metadata(settings)
        async with security.client_channel(job["address"], settings, aio=True) as channel:
            queries = queries_pb2_grpc.QueryServiceStub(channel)
            noop = channel.unary_unary(NOOP_METHOD)

            async def one() -> None:
                if kind == "NoOpCall":
                    await noop(b"x" * 40, timeout=10)
                elif kind == "GetOrderSummary":
                    request = queries_pb2.GetOrderSummaryRequest(order_id=rng.choice(order_ids))
                    await queries.GetOrderSummary(request, timeout=10, metadata=md)
                elif kind == "SearchOrders":
                    search = queries_pb2.SearchOrdersRequest(query=f"g{rng.randrange(1000)}", page_size=20)
                    await queries.SearchOrders(search, timeout=10, metadata=md)
                else:
                    nonlocal rows
                    stream = queries.ListOrderSummaries(
                        queries_pb2.ListOrderSummariesRequest(), timeout=60, metadata=md
                    )
                    received = 0
                    async for _ in stream:
                        received += 1
                        if received == 10_000:
                            stream.cancel()
                            break
                    rows += received

            async def caller() -> None:
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    await one()
                    out.append(time.perf_counter() - started)

            await asyncio.gather(*(caller() for _ in range(job["concurrency"])))
        return {"latencies": out, "seconds": time.monotonic() - load_started, "rows": rows}

    results.put(asyncio.run(run()))


def query_bench(system: LocalSystem, args: argparse.Namespace, run: int) -> dict[str, Any]:
    """Each query kind from 2 client processes; the no-op gRPC call first, with the same clients."""
    ctx = mp.get_context("spawn")
    noop_port, ready = local_stack.free_port(), ctx.Event()
    noop = ctx.Process(target=noop_server, args=(noop_port, ready), daemon=True)
    noop.start()
    ready.wait(30)
    report: dict[str, Any] = {}
    try:
        kinds = (("NoOpCall", 16), ("GetOrderSummary", 16), ("SearchOrders", 16), ("ListOrderSummaries", 2))
        for kind, concurrency in kinds:
            results = ctx.Queue()
            jobs = [
                {
                    "settings": system.settings.__dict__,
                    "address": f"127.0.0.1:{noop_port}" if kind == "NoOpCall" else system.extra["big_query_addr"],
                    "kind": kind,
                    "concurrency": concurrency // 2,
                    "seconds": args.seconds / 2,
                    "order_ids": system.order_ids,
                    "seed": run * 10 + i,
                }
                for i in range(2)
            ]
            procs = [ctx.Process(target=query_process, args=(job, results)) for job in jobs]
            for proc in procs:
                proc.start()
            outs = collect_results(results, procs, timeout=args.seconds + 120)
            elapsed = max(out["seconds"] for out in outs)
            report[kind] = summary([v for out in outs for v in out["latencies"]], elapsed)
            if kind == "ListOrderSummaries":
                report[kind]["rows_per_second"] = sum(out["rows"] for out in outs) / elapsed
    finally:
        noop.kill()
        noop.join()
    return report


def synthetic_order_id(n: int) -> str:
    """The id synthetic_read_model_sql gives its n-th order."""
    return str(uuid.UUID(hashlib.md5(str(n).encode()).hexdigest()))


def given_read_model(system: LocalSystem) -> None:
    """Against a given system: query the orders its read database has (at least those just placed)."""
    with psycopg.connect(libpq_url(system.settings.query_database), autocommit=True) as conn:
        rows = conn.execute("SELECT order_id FROM order_summaries ORDER BY random() LIMIT 10000").fetchall()
        (count,) = conn.execute("SELECT count(*) FROM order_summaries").fetchone() or (0,)
        system.extra["read_orders"] = str(count)
    system.extra["big_query_addr"] = system.settings.query_addr
    system.order_ids = [row[0] for row in rows]


def big_read_model(system: LocalSystem, orders: int) -> None:
    """A second read database with `orders` synthetic summaries, served by a query service of its own."""
    url = system.settings.read_database_url.rsplit("/", 1)[0] + "/bench_big_read"
    asyncio.run(ensure_database(url))
    from orders.migrations import READ

    upgrade(url, READ)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        if conn.execute("SELECT count(*) FROM order_summaries").fetchone() == (0,):
            conn.execute(synthetic_read_model_sql(orders))
    addresses = local_stack.free_addresses()
    system.start("query_service", read_database_url=url, **addresses)
    system.extra["big_query_addr"] = addresses["query_addr"]
    system.extra["read_orders"] = str(orders)
    system.order_ids = [
        synthetic_order_id(n) for n in random.Random(7).sample(range(1, orders + 1), min(orders, 10_000))
    ]


# --- orchestration ---------------------------------------------------------------------------------


def one_run(system: LocalSystem, args: argparse.Namespace, run: int) -> dict[str, Any]:
    raw_url = system.settings.write_database_url.rsplit("/", 1)[0] + f"/bench_raw_{run}"
    result: dict[str, Any] = {"raw_sql": asyncio.run(raw_sql(raw_url, args.concurrency, args.seconds))}
    log(run, "raw SQL", result["raw_sql"])
    result["commands_max"] = drive(system, args, rate=0.0, visibility=False, run=run)
    log(run, "commands at full speed", result["commands_max"]["commands_per_second"])
    result["commands_paced"] = drive(
        system, args, rate=result["commands_max"]["commands_per_second"] / 2, visibility=True, run=run
    )
    log(run, "commands at half speed, visibility", result["commands_paced"]["visibility_ms"])
    if system.local and args.workers_series and args.command_processes == 1:
        result["workers"] = scaling_series(system, args, run)
        log(
            run,
            "commands/s by workers per service",
            {w: round(r["commands_per_second"]) for w, r in result["workers"].items()},
        )
    result["raw_jetstream"] = asyncio.run(raw_jetstream(system, args.backlog))
    log(run, "raw JetStream", result["raw_jetstream"])
    if system.local:  # draining a backlog means stopping the projector: only on a system of our own
        result["projector_drain"] = drain(system, args.backlog, run)
        log(run, "projector drain", result["projector_drain"]["per_second"])
    if not system.local:
        given_read_model(system)
    result["queries"] = query_bench(system, args, run)
    log(run, "queries", {k: round(v["per_second"]) for k, v in result["queries"].items()})
    return result


def scaling_series(system: LocalSystem, args: argparse.Namespace, run: int) -> dict[str, Any]:
    """Commands at full speed with the command service run as 1, 2, 4 … worker processes sharing its port."""
    series: dict[str, Any] = {}
    for workers in args.workers_series:
        system.stop("command_service")
        system.start("command_service", workers=workers)
        out = drive(system, args, rate=0.0, visibility=False, run=run)
        series[str(workers)] = {
            "commands_per_second": out["commands_per_second"],
            "cpu_ms_per_command": sum(out["cpu_ms_per_command"].values()),
            "command_service_cpu_ms": out["cpu_ms_per_command"].get("command_service", 0.0),
        }
    system.stop("command_service")
    system.start("command_service", workers=1)
    return series


def log(run: int, what: str, value: Any) -> None:
    print(f"run {run + 1}: {what}: {value}", file=sys.stderr, flush=True)


def ratios(run: dict[str, Any]) -> dict[str, float]:
    place = run["commands_max"]["by_rpc"]["PlaceOrder"]["per_second"]
    drained = run.get("projector_drain", {}).get("per_second", float("nan"))
    return {
        "placeorder_vs_raw_sql": place / run["raw_sql"]["per_second"],
        "projected_vs_raw_consume": drained / run["raw_jetstream"]["consume_per_second"],
        "get_vs_noop_call": run["queries"]["GetOrderSummary"]["per_second"] / run["queries"]["NoOpCall"]["per_second"],
        # CPU per command over every process (clients included) / CPU per raw transaction (client + backends)
        "cpu_vs_raw_tx": sum(run["commands_max"]["cpu_ms_per_command"].values()) / run["raw_sql"]["cpu_ms_per_tx"],
    }


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--clients", type=int, default=2, help="client processes for the command load")
    parser.add_argument("--channels", type=int, default=4, help="command channels (TCP connections) per client process")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cancel-share", type=float, default=0.1)
    parser.add_argument("--inventory-share", type=float, default=0.1)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--read-orders", type=int, default=100_000)
    parser.add_argument(
        "--command-processes",
        type=int,
        default=1,
        help="command service processes (one relay publishes; the client processes are spread over them)",
    )
    parser.add_argument(
        "--workers-series",
        type=lambda text: [int(n) for n in text.split(",") if n],
        default=[1, 2, 4],
        help="worker processes of the command service for the scaling series (comma-separated; empty: skip)",
    )
    parser.add_argument("--out", default="bench-results")
    parser.add_argument(
        "--given",
        action="store_true",
        help="measure the system the ORDERS_* variables point at (addresses, database URLs, NATS, client "
        "TLS and token) instead of starting one; it must allow creating scratch databases and a stream",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, contextlib.ExitStack() as stack:
        if args.given:
            system = LocalSystem(Settings.from_env(), Path(tmp), local=False)
        else:
            system = stack.enter_context(local_system(Path(tmp)))
            system.start("command_service", "projector", "query_service")
            system.command_addrs = [system.settings.command_addr]
            for _ in range(args.command_processes - 1):  # more command processes, each on ports of its own
                addresses = local_stack.free_addresses()
                system.start("command_service", **addresses)
                system.command_addrs.append(addresses["command_addr"])
        seed_products(system, SKUS, stock=10_000_000)
        if system.local:
            big_read_model(system, args.read_orders)
        runs = [one_run(system, args, run) for run in range(args.runs)]
        description = machine()
        description["read_model_orders"] = int(system.extra["read_orders"])
        description["system"] = "given endpoints" if args.given else "local, started by the benchmark"
    report = {"args": vars(args), "machine": description, "runs": runs, "median": medians(runs)}
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "bench.md").write_text(table)
    print(table)
    chart(report, out / "bench.png")


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def pick(path: list[str]) -> float:
        values = []
        for run in runs:
            node: Any = run
            for key in path:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            if isinstance(node, (int, float)):
                values.append(float(node))
        return median(values)

    figures = {
        "raw_sql_tx_per_s": ["raw_sql", "per_second"],
        "raw_sql_p50_ms": ["raw_sql", "p50_ms"],
        "raw_sql_p99_ms": ["raw_sql", "p99_ms"],
        "raw_sql_cpu_ms_per_tx": ["raw_sql", "cpu_ms_per_tx"],
        "commands_per_s": ["commands_max", "commands_per_second"],
        "place_orders_per_transaction": ["commands_max", "place_orders_per_transaction"],
        "visibility_p50_ms": ["commands_paced", "visibility_ms", "p50"],
        "visibility_p99_ms": ["commands_paced", "visibility_ms", "p99"],
        "raw_publish_per_s": ["raw_jetstream", "publish_per_second"],
        "raw_atomic_publish_per_s": ["raw_jetstream", "atomic_publish_per_second"],
        "raw_consume_per_s": ["raw_jetstream", "consume_per_second"],
        "projected_per_s": ["projector_drain", "per_second"],
    }
    for kind in ("PlaceOrder", "CancelOrder", "UpdateInventory"):
        for stat in ("per_second", "p50_ms", "p95_ms", "p99_ms"):
            figures[f"{kind}_{stat}"] = ["commands_max", "by_rpc", kind, stat]
    for kind in ("NoOpCall", "GetOrderSummary", "SearchOrders", "ListOrderSummaries"):
        for stat in ("per_second", "p50_ms", "p95_ms", "p99_ms"):
            figures[f"{kind}_{stat}"] = ["queries", kind, stat]
    result: dict[str, Any] = {name: pick(path) for name, path in figures.items()}
    result["ListOrderSummaries_rows_per_s"] = pick(["queries", "ListOrderSummaries", "rows_per_second"])
    result["placeorder_vs_raw_sql"] = median([ratios(r)["placeorder_vs_raw_sql"] for r in runs])
    result["projected_vs_raw_consume"] = median([ratios(r)["projected_vs_raw_consume"] for r in runs])
    result["get_vs_noop_call"] = median([ratios(r)["get_vs_noop_call"] for r in runs])
    result["cpu_vs_raw_tx"] = median([ratios(r)["cpu_vs_raw_tx"] for r in runs])
    components = sorted({name for r in runs for name in r["commands_max"]["cpu_ms_per_command"]})
    result["cpu_ms_per_command"] = {
        name: median([r["commands_max"]["cpu_ms_per_command"].get(name, 0.0) for r in runs]) for name in components
    }
    result["cpu_ms_per_command_total"] = median([sum(r["commands_max"]["cpu_ms_per_command"].values()) for r in runs])
    series = sorted({int(w) for r in runs for w in r.get("workers", {})})
    result["workers"] = {
        str(w): {
            stat: median([r["workers"][str(w)][stat] for r in runs if str(w) in r.get("workers", {})])
            for stat in ("commands_per_second", "cpu_ms_per_command", "command_service_cpu_ms")
        }
        for w in series
    }
    for service in ("command_service", "projector", "query_service"):
        result[f"{service}_max_rss_mb"] = max(r["commands_max"]["max_rss_mb"].get(service, 0.0) for r in runs)
    return result


def markdown(report: dict[str, Any]) -> str:
    m, d, a = report["median"], report["machine"], report["args"]
    rows = [
        (
            "PlaceOrder via gRPC (full speed)",
            f"{m['PlaceOrder_per_second']:,.0f}/s",
            f"p50 {m['PlaceOrder_p50_ms']:.1f} / p95 {m['PlaceOrder_p95_ms']:.1f} "
            f"/ p99 {m['PlaceOrder_p99_ms']:.1f} ms",
        ),
        (
            "raw psycopg PlaceOrder transaction (8 statements)",
            f"{m['raw_sql_tx_per_s']:,.0f}/s",
            f"p50 {m['raw_sql_p50_ms']:.1f} / p99 {m['raw_sql_p99_ms']:.1f} ms",
        ),
        ("ratio PlaceOrder / raw SQL", f"{m['placeorder_vs_raw_sql']:.2f}", ""),
        ("PlaceOrders per transaction (group commit), full speed", f"{m['place_orders_per_transaction']:.1f}", ""),
        (
            "CPU per command, all processes / CPU per raw transaction (client + PostgreSQL)",
            f"{m['cpu_ms_per_command_total']:.2f} / {m['raw_sql_cpu_ms_per_tx']:.2f} ms",
            f"ratio {m['cpu_vs_raw_tx']:.2f}",
        ),
        (
            "CancelOrder",
            f"{m['CancelOrder_per_second']:,.0f}/s",
            f"p50 {m['CancelOrder_p50_ms']:.1f} / p99 {m['CancelOrder_p99_ms']:.1f} ms",
        ),
        (
            "UpdateInventory",
            f"{m['UpdateInventory_per_second']:,.0f}/s",
            f"p50 {m['UpdateInventory_p50_ms']:.1f} / p99 {m['UpdateInventory_p99_ms']:.1f} ms",
        ),
        ("all commands", f"{m['commands_per_s']:,.0f}/s", ""),
        (
            "visibility at half that rate (OK → token read)",
            "",
            f"p50 {m['visibility_p50_ms']:.1f} / p99 {m['visibility_p99_ms']:.1f} ms",
        ),
        (f"projector draining {a['backlog']:,} events", f"{m['projected_per_s']:,.0f} events/s", ""),
        ("raw JetStream pull consumer, same events", f"{m['raw_consume_per_s']:,.0f} events/s", ""),
        ("ratio projected / raw consume", f"{m['projected_vs_raw_consume']:.2f}", ""),
        ("raw JetStream publish with acks (256 in flight)", f"{m['raw_publish_per_s']:,.0f} events/s", ""),
        (
            "raw JetStream atomic batches of 256, one after another",
            f"{m['raw_atomic_publish_per_s']:,.0f} events/s",
            "",
        ),
        (
            "no-op gRPC unary call (grpc.aio server, same clients), 16 callers",
            f"{m['NoOpCall_per_second']:,.0f}/s",
            f"p50 {m['NoOpCall_p50_ms']:.1f} / p99 {m['NoOpCall_p99_ms']:.1f} ms",
        ),
        (
            "GetOrderSummary, 16 callers",
            f"{m['GetOrderSummary_per_second']:,.0f}/s",
            f"p50 {m['GetOrderSummary_p50_ms']:.1f} / p99 {m['GetOrderSummary_p99_ms']:.1f} ms",
        ),
        ("ratio GetOrderSummary / no-op call", f"{m['get_vs_noop_call']:.2f}", ""),
        (
            "SearchOrders, 16 callers",
            f"{m['SearchOrders_per_second']:,.0f}/s",
            f"p50 {m['SearchOrders_p50_ms']:.1f} / p99 {m['SearchOrders_p99_ms']:.1f} ms",
        ),
        ("ListOrderSummaries, streams of up to 10,000 rows", f"{m['ListOrderSummaries_rows_per_s']:,.0f} rows/s", ""),
        (
            "max resident memory (command / projector / query)",
            f"{m['command_service_max_rss_mb']:.0f} / {m['projector_max_rss_mb']:.0f} "
            f"/ {m['query_service_max_rss_mb']:.0f} MB",
            "",
        ),
    ]
    head = (
        f"Medians of {a['runs']} runs; {d['cores']} cores, {d['memory_gib']} GiB, Python {d['python']}, "
        f"{d['postgres']}, {d['nats_server']}; {a['concurrency']} concurrent callers from {a['clients']} "
        f"processes, {a['seconds']:g} s per phase; queries on {d['read_model_orders']:,} orders; "
        f"{d['system']}.\n\n| what | throughput | latency |\n|---|---|---|\n"
    )
    cpu = m["cpu_ms_per_command"]
    if not any(name != "clients" for name in cpu):  # a given system: its processes run elsewhere
        cpu = {}
    where = (
        ""
        if not cpu
        else (
            "\n\nWhere the time goes at full command speed (CPU ms per command, until the projector caught up): "
            + ", ".join(f"{name} {ms:.2f}" for name, ms in sorted(cpu.items(), key=lambda item: -item[1]))
            + f"; total {sum(cpu.values()):.2f} ms for {d['cores']} cores.\n"
        )
    )
    one = m["workers"].get("1", {}).get("commands_per_second")
    for workers, figures in m["workers"].items():
        rows.append(
            (
                f"all commands, command service as {workers} worker process{'es' if workers != '1' else ''}",
                f"{figures['commands_per_second']:,.0f}/s"
                + (f" ({figures['commands_per_second'] / one:.2f} x 1)" if one else ""),
                f"CPU per command {figures['cpu_ms_per_command']:.2f} ms "
                f"(command service {figures['command_service_cpu_ms']:.2f})",
            )
        )
    shown = [r for r in rows if "nan" not in r[1] + r[2] and not r[1].startswith("0 / 0 / 0")]
    table = "\n".join(f"| {what} | {rate} | {latency} |" for what, rate, latency in shown)
    return head + table + where


def chart(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install -e '.[bench]')", file=sys.stderr)
        return
    m, last = report["median"], report["runs"][-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = ["PlaceOrder", "CancelOrder", "UpdateInventory", "GetOrderSummary", "SearchOrders"]
    for offset, p in enumerate(("p50", "p95", "p99")):
        values = [m.get(f"{n}_{p}_ms", float("nan")) for n in names]
        left.bar([i + offset * 0.27 for i in range(len(names))], values, width=0.27, label=p)
    left.set_xticks([i + 0.27 for i in range(len(names))], names, rotation=15)
    left.set_ylabel("ms")
    left.set_title("latency percentiles (medians of runs)")
    left.legend()
    for label, series in (
        ("commands at full speed", last["commands_max"]["lag"]),
        ("draining the backlog", last.get("projector_drain", {}).get("lag", [])),
    ):
        right.plot([t for t, _ in series], [n for _, n in series], label=label)
    right.set_xlabel("s")
    right.set_ylabel("events behind")
    right.set_title("projector lag over time (last run)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
