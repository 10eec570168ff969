"""Helpers shared by the tests: the running system's handles, isolated settings, bounded waits."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import psycopg
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from orders import jetstream, local_stack, migrations
from orders.config import Settings
from orders.conversions import timestamp
from orders.db import libpq_url
from orders.events import ORDER, PRODUCT, EventContext, OutgoingEvent, build_event, parse_event
from orders.v1 import commands_pb2, commands_pb2_grpc, common_pb2, events_pb2, queries_pb2_grpc

T = TypeVar("T")


@dataclass
class Infra:
    """Where the tests' PostgreSQL and NATS are: an admin URL template and a NATS URL."""

    postgres_url: Callable[[str], str]
    nats_url: str


@dataclass
class Stack:
    """The running system: settings, service processes and gRPC stubs."""

    settings: Settings
    processes: dict[str, local_stack.ManagedProcess]
    commands: commands_pb2_grpc.CommandServiceStub
    queries: queries_pb2_grpc.QueryServiceStub
    log_dir: Path

    def start(self, module: str) -> local_stack.ManagedProcess:
        proc = start_serving(module, self.settings, self.log_dir)
        self.processes[module] = proc
        return proc


def isolated_settings(infra: Infra, **overrides: Any) -> Settings:
    """Settings for one isolated system: its own databases, stream, consumer and ports."""
    suffix = uuid.uuid4().hex[:10]
    values: dict[str, Any] = dict(
        write_database_url=infra.postgres_url(f"orders_write_{suffix}"),
        read_database_url=infra.postgres_url(f"orders_read_{suffix}"),
        nats_url=infra.nats_url,
        **local_stack.free_addresses(),
        stream=f"ORDERS_EVENTS_{suffix}",
        consumer=f"projector_{suffix}",
        auth="off",
        workers=1,  # one process per service, as the tests kill and freeze them by pid; tests of workers say 2
    )
    return Settings(**(values | overrides))


async def migrate(settings: Settings) -> None:
    await migrations.migrate(settings)


SERVICE_ADDRESS = {"command_service": "command_addr", "query_service": "query_addr", "projector": "admin_addr"}


def start_serving(
    module: str, settings: Settings, log_dir: Path, timeout: float = 60, extra_env: dict[str, str] | None = None
) -> local_stack.ManagedProcess:
    """Start one service process and wait until its gRPC health answers SERVING (stop it if it never does)."""
    proc = local_stack.start_service(module, {**settings.to_env(), **(extra_env or {})}, log_dir)
    address = getattr(settings, SERVICE_ADDRESS[module])
    try:
        local_stack.wait_until(lambda: serving_or_raise(address, {module: proc}), timeout, f"{module} SERVING")
    except BaseException:
        proc.stop()
        raise
    return proc


def serving_or_raise(address: str, processes: dict[str, local_stack.ManagedProcess]) -> bool:
    for proc in processes.values():
        if not proc.alive():
            raise RuntimeError(f"{proc.name} died:\n{proc.log_tail()}")
    return local_stack.grpc_serving(address)


def eventually(probe: Callable[[], T | bool | None], timeout: float = 5.0, what: str = "condition") -> T:
    """Call probe until it returns a truthy value (returned), or fail after timeout seconds. The probe
    may answer `condition and value`: its False is never returned."""
    result: list[T] = []

    def check() -> bool:
        value = probe()
        if value:
            result.append(cast(T, value))  # not False: falsy
            return True
        return False

    local_stack.wait_until(check, timeout, what, interval=0.05)
    return result[0]


def stays(probe: Callable[[], bool], duration: float, what: str = "condition") -> None:
    """Check probe holds every 0.1 s for duration seconds; fail as soon as it does not."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert probe(), f"{what} no longer holds"
        time.sleep(0.1)


def bad_fields(err: grpc.RpcError) -> set[str]:
    """The fields named by an INVALID_ARGUMENT error's google.rpc.BadRequest details."""
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    status = rpc_status.from_call(err)
    assert status is not None
    details = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(details)
    return {v.field for v in details.field_violations}


def live_processes() -> dict[int, int]:
    """Every live process (zombies left out) and its parent's pid, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            if state != "Z":
                parents[int(entry.name)] = int(parent)
    return parents


def children(pid: int, *, all_levels: bool = False) -> set[int]:
    """The live processes whose parent is pid (with all_levels, their children too, and so on)."""
    parents = live_processes()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
        if not all_levels:
            break
    return found


def scrape_metrics(address: str) -> dict[str, float]:
    """A process's Prometheus samples (name with labels → value), scraped over HTTP."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.rpartition(" ")[0]: float(sample.rpartition(" ")[2])
        for sample in text.splitlines()
        if sample and not sample.startswith("#")
    }


def synthetic_read_model_sql(orders: int) -> str:
    """SQL that fills an empty read model with `orders` summaries (5,000 customers, 1,000 products)."""
    return f"""
INSERT INTO order_summaries (order_id, customer_id, status, lines, item_count, total_minor, currency, placed_at,
                             updated_at, cancel_reason, version, stream_seq, search)
SELECT md5(i::text)::uuid::text, 'customer-' || (i % 5000),
       CASE WHEN i % 7 = 0 THEN 'CANCELLED' ELSE 'PLACED' END,
       jsonb_build_array(jsonb_build_object('sku', 'SKU-' || (i % 1000), 'name', 'Gadget g' || (i % 1000),
                                            'quantity', 1 + i % 3, 'unit_price_minor', 250)),
       1 + i % 3, 250 * (1 + i % 3), 'EUR', now() - i * interval '1 minute', now() - i * interval '1 minute', '',
       CASE WHEN i % 7 = 0 THEN 2 ELSE 1 END, i,
       to_tsvector('simple', 'customer-' || (i % 5000) || ' SKU-' || (i % 1000) || ' Gadget g' || (i % 1000))
FROM generate_series(1, {orders}) AS i;
INSERT INTO product_views (sku, name, unit_price_minor, currency, stock, version, stream_seq, updated_at)
SELECT 'SKU-' || i, 'Gadget g' || i, 250, 'EUR', i % 4, 1, {orders} + i, now() FROM generate_series(0, 999) AS i;
ANALYZE order_summaries;
ANALYZE product_views;
"""


@dataclass
class History:
    """A consistent synthetic event history, and the read state it must project to."""

    events: list[OutgoingEvent]
    products: dict[str, tuple[int, int]]  # sku → (version, stock)
    orders: dict[str, tuple[int, str]]  # order id → (version, status)


def synthetic_history(
    events: int, orders: int, products: int, *, seed: int = 7, prefix: str = "H", order_share: float = 0.5
) -> History:
    """Events as the command side would write them: products, orders reserving stock, cancellations,
    inventory adjustments; each aggregate's versions consecutive from 1."""
    rng = random.Random(seed)
    meta = EventContext(occurred_at=datetime.now(UTC), correlation_id="synthetic", causation_id="synthetic")
    out: list[OutgoingEvent] = []
    stock: dict[str, int] = {}
    version: dict[str, int] = {}
    placed: dict[str, list[tuple[str, int]]] = {}
    status: dict[str, str] = {}
    skus = [f"{prefix}-{i}" for i in range(products)]

    def product_event(sku: str, **payload: Any) -> None:
        version[sku] = version.get(sku, 0) + 1
        out.append(build_event(meta, PRODUCT, sku, version[sku], **payload))

    for sku in skus:
        stock[sku] = 1_000_000
        upserted = events_pb2.ProductUpserted(
            name=f"Product {sku}", unit_price=common_pb2.Money(currency_code="EUR", minor_units=250), stock=stock[sku]
        )
        product_event(sku, product_upserted=upserted)
    while len(out) < events:
        roll = rng.random()
        open_orders = [o for o, s in status.items() if s == "PLACED"]
        if len(placed) < orders and roll < order_share:
            order_id = str(uuid.UUID(int=rng.getrandbits(128)))
            lines = [(sku, rng.randint(1, 5)) for sku in sorted(rng.sample(skus, rng.randint(1, 3)))]
            placed[order_id], status[order_id], version[order_id] = lines, "PLACED", 1
            body = events_pb2.OrderPlaced(
                customer_id=f"{prefix}-customer-{rng.randint(1, 20)}",
                lines=[
                    events_pb2.OrderLine(
                        sku=s,
                        name=f"Product {s}",
                        quantity=q,
                        unit_price=common_pb2.Money(currency_code="EUR", minor_units=250),
                    )
                    for s, q in lines
                ],
                total=common_pb2.Money(currency_code="EUR", minor_units=250 * sum(q for _, q in lines)),
                placed_at=timestamp(meta.occurred_at),
            )
            out.append(build_event(meta, ORDER, order_id, 1, order_placed=body))
            for sku, quantity in lines:
                stock[sku] -= quantity
                product_event(
                    sku, stock_reserved=events_pb2.StockReserved(order_id=order_id, quantity=quantity, stock=stock[sku])
                )
        elif open_orders and roll < 0.55:
            order_id = rng.choice(open_orders)
            status[order_id], version[order_id] = "CANCELLED", 2
            out.append(
                build_event(meta, ORDER, order_id, 2, order_cancelled=events_pb2.OrderCancelled(reason="synthetic"))
            )
            for sku, quantity in placed[order_id]:
                stock[sku] += quantity
                product_event(
                    sku, stock_released=events_pb2.StockReleased(order_id=order_id, quantity=quantity, stock=stock[sku])
                )
        else:
            sku = rng.choice(skus)
            delta = rng.randint(1, 50)
            stock[sku] += delta
            product_event(sku, inventory_adjusted=events_pb2.InventoryAdjusted(delta=delta, stock=stock[sku]))
    return History(
        events=out,
        products={sku: (version[sku], stock[sku]) for sku in skus},
        orders={o: (version[o], status[o]) for o in placed},
    )


async def publish_events(
    settings: Settings, events: list[OutgoingEvent], *, in_flight: int = 256, duplicate_share: float = 0.0
) -> None:
    """Publish events to settings.stream (created if missing), in_flight acks at a time.

    duplicate_share re-publishes that fraction of events once more under a new message id (a copy the
    stream's deduplication cannot catch), to exercise the projector's own duplicate detection.
    """
    nc = await jetstream.connect(settings.nats_url, "test-publisher", retry_forever=False)
    try:
        await jetstream.ensure_stream(nc, settings)
        js = nc.jetstream(timeout=30)
        rng = random.Random(len(events))
        sends = [(e, e.event_id) for e in events]
        sends += [(e, str(uuid.uuid4())) for e in events if rng.random() < duplicate_share]
        for start in range(0, len(sends), in_flight):
            await asyncio.gather(
                *(
                    js.publish(e.subject, e.payload, headers={"Nats-Msg-Id": msg_id})
                    for e, msg_id in sends[start : start + in_flight]
                )
            )
    finally:
        await jetstream.close(nc)


def read_rows(settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    """Every projected row (search column excluded), sorted, for comparing read models."""
    import psycopg

    from orders.db import libpq_url

    with psycopg.connect(libpq_url(settings.read_database_url)) as conn:
        orders = conn.execute(
            "SELECT order_id, customer_id, status, lines, item_count, total_minor, currency, placed_at, updated_at,"
            " cancel_reason, version, stream_seq FROM order_summaries ORDER BY order_id"
        ).fetchall()
        products = conn.execute("SELECT * FROM product_views ORDER BY sku").fetchall()
    return {"orders": [tuple(r) for r in orders], "products": [tuple(r) for r in products]}


def projected_state(settings: Settings) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, str]]]:
    rows = read_rows(settings)
    products = {r[0]: (r[5], r[4]) for r in rows["products"]}
    orders = {r[0]: (r[10], r[2]) for r in rows["orders"]}
    return products, orders


def projects(settings: Settings, history: History, *, exactly: bool = True) -> bool:
    """True once the read database holds the state history must project to (and nothing else, if exactly)."""
    products, orders = projected_state(settings)
    if exactly:
        return products == history.products and orders == history.orders
    return all(products.get(k) == v for k, v in history.products.items()) and all(
        orders.get(k) == v for k, v in history.orders.items()
    )


def new_id() -> str:
    return str(uuid.uuid4())


def new_sku(prefix: str = "T") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def add_product(
    commands: commands_pb2_grpc.CommandServiceStub,
    sku: str,
    *,
    stock: int,
    price: int = 100,
    currency: str = "EUR",
    name: str | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    """Create a catalog product through the CommandService and set its stock."""
    commands.UpsertProduct(
        commands_pb2.UpsertProductRequest(
            request_id=new_id(),
            sku=sku,
            name=name or f"Product {sku}",
            unit_price=common_pb2.Money(currency_code=currency, minor_units=price),
        ),
        timeout=10,
        metadata=metadata,
    )
    if stock:
        commands.UpdateInventory(
            commands_pb2.UpdateInventoryRequest(request_id=new_id(), sku=sku, set_level=stock),
            timeout=10,
            metadata=metadata,
        )


def place(
    commands: commands_pb2_grpc.CommandServiceStub,
    customer: str,
    *lines: tuple[str, int],
    request_id: str | None = None,
) -> commands_pb2.PlaceOrderResponse:
    return commands.PlaceOrder(  # type: ignore[no-any-return]
        commands_pb2.PlaceOrderRequest(
            request_id=request_id or new_id(),
            customer_id=customer,
            lines=[commands_pb2.PlaceOrderLine(sku=s, quantity=q) for s, q in lines],
        ),
        timeout=10,
    )


def product_event(sku: str, version: int, stock: int) -> OutgoingEvent:
    """A product aggregate's event as the command side would write it: upserted at 1, adjusted after."""
    meta = EventContext(occurred_at=datetime.now(UTC), correlation_id="test", causation_id="test")
    if version == 1:
        upserted = events_pb2.ProductUpserted(
            name=f"Product {sku}", unit_price=common_pb2.Money(currency_code="EUR", minor_units=100), stock=stock
        )
        return build_event(meta, PRODUCT, sku, version, product_upserted=upserted)
    adjusted = events_pb2.InventoryAdjusted(delta=1, stock=stock)
    return build_event(meta, PRODUCT, sku, version, inventory_adjusted=adjusted)


def verify_cli(settings: Settings) -> tuple[int, dict[str, Any]]:
    """`orders verify --stream --json` as the real CLI, with the scenario's settings in its environment."""
    done = subprocess.run(
        [sys.executable, "-m", "orders.cli", "verify", "--stream", "--json"],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode == 3:  # a database or NATS could not be reached (yet): no report
        return done.returncode, {"unreachable": done.stderr.strip()}
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


# --- the stream against the write database -------------------------------------------------------


@dataclass(frozen=True)
class StreamEvent:
    seq: int
    subject: str  # as stored: with the partition appended when the stream is partitioned
    msg_id: str
    aggregate: tuple[str, str]
    version: int
    batch: str | None  # the relay's atomic batch that stored it (Nats-Batch-Id), if any


async def _read_stream(settings: Settings) -> list[StreamEvent]:
    nc = await jetstream.connect(settings.nats_url, "test-reader", retry_forever=False)
    try:
        jsm = nc.jsm()
        state = (await jsm.stream_info(settings.stream)).state
        events = []
        for seq in range(state.first_seq, state.last_seq + 1):
            msg = await jsm.get_msg(settings.stream, seq)
            envelope = parse_event(msg.data or b"")
            events.append(
                StreamEvent(
                    seq,
                    msg.subject or "",
                    (msg.headers or {})["Nats-Msg-Id"],
                    (envelope.aggregate_type, envelope.aggregate_id),
                    envelope.aggregate_version,
                    (msg.headers or {}).get("Nats-Batch-Id"),
                )
            )
        return events
    finally:
        await jetstream.close(nc)


def stream_events(settings: Settings) -> list[StreamEvent]:
    return asyncio.run(_read_stream(settings))


def unpublished(settings: Settings) -> int:
    """Outbox rows: the relay deletes each one once JetStream acknowledged it."""
    with psycopg.connect(libpq_url(settings.write_database_url)) as conn:
        row = conn.execute("SELECT count(*) FROM outbox").fetchone()
    return row[0] if row else 0


def aggregate_versions(settings: Settings) -> dict[tuple[str, str], int]:
    """Every aggregate of the write database with its current version (= how many events it has had)."""
    with psycopg.connect(libpq_url(settings.write_database_url)) as conn:
        rows = conn.execute(
            "SELECT 'order', id::text, version FROM orders UNION ALL SELECT 'product', sku, version FROM products"
        ).fetchall()
    return {(kind, key): version for kind, key, version in rows}


def assert_stream_matches_write_database(settings: Settings) -> list[StreamEvent]:
    """With the outbox drained: every event committed in the write database is in the stream exactly
    once, and only those: each aggregate has versions 1 to its version in the write database, in stream
    order, no event id twice."""
    assert unpublished(settings) == 0
    events = stream_events(settings)
    counts = Counter(e.msg_id for e in events)
    assert [msg_id for msg_id, n in counts.items() if n > 1] == []
    versions: dict[tuple[str, str], list[int]] = defaultdict(list)
    for event in events:
        versions[event.aggregate].append(event.version)
    expected = aggregate_versions(settings)
    assert set(versions) == set(expected)
    for aggregate, seen in versions.items():
        assert seen == list(range(1, expected[aggregate] + 1)), (aggregate, seen)
    return events


class CommandProcess:
    """One command service process and a client for it."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.proc = start_serving("command_service", settings, log_dir)
        self.channel = grpc.insecure_channel(settings.command_addr)
        self.stub = commands_pb2_grpc.CommandServiceStub(self.channel)

    def product(self, sku: str, stock: int) -> None:
        add_product(self.stub, sku, stock=stock, price=10)

    def order(self, *skus: str) -> commands_pb2.PlaceOrderResponse:
        return place(self.stub, "relay-test", *[(s, 1) for s in skus])

    def stop(self) -> None:
        self.channel.close()
        self.proc.stop()
