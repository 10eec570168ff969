"""The command side under bad input, retries, version races and concurrency, against real servers."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from orders import local_stack
from orders.db import libpq_url
from orders.v1 import commands_pb2, commands_pb2_grpc, common_pb2
from tests.support import (
    Infra,
    Stack,
    add_product,
    bad_fields,
    eventually,
    isolated_settings,
    migrate,
    new_id,
    new_sku,
    start_serving,
)


def order_request(customer: str, *lines: tuple[str, int]) -> commands_pb2.PlaceOrderRequest:
    return commands_pb2.PlaceOrderRequest(
        request_id=new_id(),
        customer_id=customer,
        lines=[commands_pb2.PlaceOrderLine(sku=s, quantity=q) for s, q in lines],
    )


def error_of(call, request) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    return err.value  # type: ignore[return-value]


def table_counts(stack: Stack) -> dict[str, int]:
    with psycopg.connect(libpq_url(stack.settings.write_database_url)) as conn:
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
            for table in ("products", "orders", "order_items", "outbox", "idempotency_keys")
        }


def stock_of(stack: Stack, sku: str) -> tuple[int, int]:
    with psycopg.connect(libpq_url(stack.settings.write_database_url)) as conn:
        row = conn.execute("SELECT stock, version FROM products WHERE sku = %s", (sku,)).fetchone()
    assert row is not None
    return row[0], row[1]


# --- 1. validation ------------------------------------------------------------------------------


def test_every_command_rejects_bad_fields_all_at_once_and_writes_nothing(stack: Stack) -> None:
    before = table_counts(stack)
    c = stack.commands
    assert bad_fields(
        error_of(
            c.PlaceOrder,
            commands_pb2.PlaceOrderRequest(
                request_id="",
                customer_id="x" * 129,
                lines=[
                    commands_pb2.PlaceOrderLine(sku="ok", quantity=1),
                    commands_pb2.PlaceOrderLine(sku="ok", quantity=0),
                    commands_pb2.PlaceOrderLine(sku="bad sku", quantity=10_001),
                ],
            ),
        )
    ) == {"request_id", "customer_id", "lines[1].sku", "lines[1].quantity", "lines[2].sku", "lines[2].quantity"}
    assert bad_fields(
        error_of(
            c.PlaceOrder,
            commands_pb2.PlaceOrderRequest(
                request_id=new_id(),
                customer_id="c",
                lines=[commands_pb2.PlaceOrderLine(sku=f"S{i}", quantity=1) for i in range(101)],
            ),
        )
    ) == {"lines"}
    assert bad_fields(
        error_of(
            c.CancelOrder,
            commands_pb2.CancelOrderRequest(
                request_id=new_id(), order_id="not-a-uuid", reason="r" * 501, expected_version=-1
            ),
        )
    ) == {"order_id", "reason", "expected_version"}
    assert bad_fields(
        error_of(c.UpdateInventory, commands_pb2.UpdateInventoryRequest(request_id=new_id(), sku="", delta=0))
    ) == {"sku", "delta"}
    assert bad_fields(
        error_of(c.UpdateInventory, commands_pb2.UpdateInventoryRequest(request_id=new_id(), sku="S"))
    ) == {"change"}
    assert bad_fields(
        error_of(c.UpdateInventory, commands_pb2.UpdateInventoryRequest(request_id=new_id(), sku="S", set_level=-5))
    ) == {"set_level"}
    assert bad_fields(
        error_of(
            c.UpsertProduct,
            commands_pb2.UpsertProductRequest(
                request_id=new_id(),
                sku="S!",
                name="n" * 201,
                unit_price=common_pb2.Money(currency_code="EURO", minor_units=-1),
            ),
        )
    ) == {"sku", "name", "unit_price.currency_code", "unit_price.minor_units"}
    assert table_counts(stack) == before


def test_undecodable_request_bytes_are_invalid_argument_not_internal(stack: Stack) -> None:
    with grpc.insecure_channel(stack.settings.command_addr) as channel:
        raw = channel.unary_unary("/orders.v1.CommandService/PlaceOrder")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\x0a\xff\xff\xff\xff\xff", timeout=5)  # field 1, length beyond the message
    assert bad_fields(err.value) == {"request"}


# --- 2. error mapping ---------------------------------------------------------------------------


def test_not_found_precondition_and_reuse_errors(stack: Stack) -> None:
    c = stack.commands
    assert (
        error_of(c.CancelOrder, commands_pb2.CancelOrderRequest(request_id=new_id(), order_id=new_id())).code()
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        error_of(
            c.UpdateInventory, commands_pb2.UpdateInventoryRequest(request_id=new_id(), sku=new_sku("C"), delta=1)
        ).code()
        == grpc.StatusCode.NOT_FOUND
    )

    sku = new_sku("C")
    add_product(stack.commands, sku, stock=2)
    short = error_of(c.UpdateInventory, commands_pb2.UpdateInventoryRequest(request_id=new_id(), sku=sku, delta=-3))
    assert short.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(short)
    failure = error_details_pb2.PreconditionFailure()
    assert status is not None and status.details[0].Unpack(failure)
    assert (failure.violations[0].type, failure.violations[0].subject) == ("INSUFFICIENT_STOCK", sku)

    dollars = new_sku("C")
    add_product(stack.commands, dollars, stock=5, currency="USD")
    mixed = error_of(c.PlaceOrder, order_request("c", (sku, 1), (dollars, 1)))
    assert mixed.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stock_of(stack, sku)[0] == 2 and stock_of(stack, dollars)[0] == 5  # nothing reserved

    reused = new_id()
    c.UpdateInventory(commands_pb2.UpdateInventoryRequest(request_id=reused, sku=sku, delta=1), timeout=5)
    assert (
        error_of(c.UpdateInventory, commands_pb2.UpdateInventoryRequest(request_id=reused, sku=sku, delta=2)).code()
        == grpc.StatusCode.ALREADY_EXISTS
    )
    assert (
        error_of(
            c.PlaceOrder,
            commands_pb2.PlaceOrderRequest(
                request_id=reused,
                customer_id="c",
                lines=[commands_pb2.PlaceOrderLine(sku=sku, quantity=1)],
            ),
        ).code()
        == grpc.StatusCode.ALREADY_EXISTS
    )  # same key, different command
    assert stock_of(stack, sku)[0] == 3


def test_database_unreachable_at_start_is_not_serving_and_unavailable(infra: Infra, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A command service whose database does not answer serves NOT_SERVING and fails calls with UNAVAILABLE."""
    settings = isolated_settings(
        infra, write_database_url=f"postgresql://postgres@127.0.0.1:{local_stack.free_port()}/x"
    )
    proc = local_stack.start_service("command_service", settings.to_env(), tmp_path)
    try:
        assert eventually(lambda: local_stack.grpc_health(settings.command_addr), 30, "health answers") == "NOT_SERVING"
        with grpc.insecure_channel(settings.command_addr) as channel:
            place = channel.unary_unary(
                "/orders.v1.CommandService/PlaceOrder",
                request_serializer=commands_pb2.PlaceOrderRequest.SerializeToString,
                response_deserializer=commands_pb2.PlaceOrderResponse.FromString,
            )
            err = error_of(place, order_request("c", ("SKU-1", 1)))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "Traceback" not in (err.details() or "")
    finally:
        proc.stop()


def test_health_follows_the_write_database_and_commands_recover_without_a_restart(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    pg = local_stack.start_postgres(tmp_path / "pg", durable=False)
    # NATS of its own: on the session's, the session's stream already holds the event subjects.
    settings = isolated_settings(infra, write_database_url=pg.url("orders_write"), nats_url=own_nats.url)
    proc = None
    try:
        asyncio.run(migrate(settings))
        proc = start_serving("command_service", settings, tmp_path)
        stub = commands_pb2_grpc.CommandServiceStub(grpc.insecure_channel(settings.command_addr))
        sku = new_sku("H")
        add_product(stub, sku, stock=10)
        eventually(lambda: local_stack.grpc_health(settings.command_addr, "relay") == "SERVING", 15, "relay")
        pg.stop()
        eventually(lambda: local_stack.grpc_health(settings.command_addr) == "NOT_SERVING", 10, "NOT_SERVING")
        started = time.monotonic()
        refused = error_of(stub.PlaceOrder, order_request("h", (sku, 1)))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 8
        # NATS is fine, but the relay cannot read its outbox either: no progress is possible.
        eventually(lambda: local_stack.grpc_health(settings.command_addr, "relay") == "NOT_SERVING", 10, "relay")
        pg = local_stack.start_postgres(tmp_path / "pg", pg.port, durable=False)
        eventually(lambda: local_stack.grpc_serving(settings.command_addr), 10, "SERVING again")
        eventually(lambda: local_stack.grpc_health(settings.command_addr, "relay") == "SERVING", 15, "relay again")
        assert eventually(lambda: _place_or_none(stub, order_request("h", (sku, 1))), 10, "a command succeeds")
    finally:
        if proc is not None:
            proc.stop()
        pg.stop()


def _place_or_none(stub: commands_pb2_grpc.CommandServiceStub, request: commands_pb2.PlaceOrderRequest) -> object:
    try:
        return stub.PlaceOrder(request, timeout=5)
    except grpc.RpcError:
        return None


# --- 3. idempotency -----------------------------------------------------------------------------


def test_racing_duplicates_produce_one_effect_and_identical_responses(stack: Stack) -> None:
    sku = new_sku("C")
    add_product(stack.commands, sku, stock=1000)
    customer = f"race-{new_id()}"
    requests = [order_request(customer, (sku, 1)) for _ in range(40)]

    def send(request: commands_pb2.PlaceOrderRequest) -> commands_pb2.PlaceOrderResponse:
        return stack.commands.PlaceOrder(request, timeout=20)

    with ThreadPoolExecutor(max_workers=16) as pool:
        first = list(pool.map(send, requests))
        second = list(pool.map(send, requests))  # every request again, racing the others
        third = list(pool.map(send, [r for pair in zip(requests, requests, strict=True) for r in pair]))
    assert first == second == third[::2] == third[1::2]
    assert len({r.order_id for r in first}) == 40
    with psycopg.connect(libpq_url(stack.settings.write_database_url)) as conn:
        orders = conn.execute("SELECT count(*) FROM orders WHERE customer_id = %s", (customer,)).fetchone()
    assert orders is not None and orders[0] == 40
    assert stock_of(stack, sku)[0] == 960


def test_simultaneous_first_attempts_of_one_request_apply_once(stack: Stack) -> None:
    sku = new_sku("C")
    add_product(stack.commands, sku, stock=100)
    customer = f"twin-{new_id()}"
    request = order_request(customer, (sku, 2))
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(lambda _: stack.commands.PlaceOrder(request, timeout=20), range(8)))
    assert all(reply == replies[0] for reply in replies)
    assert stock_of(stack, sku)[0] == 98


def test_simultaneous_first_attempts_of_every_command_apply_once(stack: Stack) -> None:
    """Eight copies of one request at once, for each command: one effect, eight identical responses,
    even where the copies that waited would fail the rule once the first has committed (the order is
    no longer PLACED, the product exists)."""
    c = stack.commands
    sku = new_sku("C")
    add_product(c, sku, stock=100)
    placed = c.PlaceOrder(order_request(f"twin-{new_id()}", (sku, 2)), timeout=20)
    cancel = commands_pb2.CancelOrderRequest(request_id=new_id(), order_id=placed.order_id, reason="twins")
    adjust = commands_pb2.UpdateInventoryRequest(request_id=new_id(), sku=sku, delta=5)
    created = new_sku("C")
    upsert = commands_pb2.UpsertProductRequest(
        request_id=new_id(), sku=created, name="Twin", unit_price=common_pb2.Money(currency_code="EUR", minor_units=9)
    )
    calls = [(c.CancelOrder, cancel), (c.UpdateInventory, adjust), (c.UpsertProduct, upsert)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        # Eight products at once first, so that the service holds eight database connections: the copies
        # below then start their transactions together, not one connection set-up after another.
        list(pool.map(lambda _: add_product(c, new_sku("W"), stock=1), range(16)))
        for method, request in calls:
            start = threading.Barrier(8)

            def send(_: int, m: Any = method, r: Any = request, together: threading.Barrier = start) -> Any:
                together.wait(10)
                return m(r, timeout=20)

            replies = list(pool.map(send, range(8)))
            assert all(reply == replies[0] for reply in replies), (type(request).__name__, replies)
    assert stock_of(stack, sku)[0] == 100 + 5  # 2 reserved, 2 given back by the one cancellation, 5 added once
    with psycopg.connect(libpq_url(stack.settings.write_database_url)) as conn:
        row = conn.execute("SELECT version FROM products WHERE sku = %s", (created,)).fetchone()
        order = conn.execute("SELECT version FROM orders WHERE id = %s", (placed.order_id,)).fetchone()
    assert row == (1,) and order == (2,)


# --- 4. optimistic concurrency ------------------------------------------------------------------


def test_expected_version_guards_every_update(stack: Stack) -> None:
    c = stack.commands
    sku = new_sku("C")
    created = c.UpsertProduct(
        commands_pb2.UpsertProductRequest(
            request_id=new_id(),
            sku=sku,
            name="v1",
            unit_price=common_pb2.Money(currency_code="EUR", minor_units=1),
            expected_version=0,
        ),
        timeout=5,
    )
    assert created.version == 1
    again = error_of(
        c.UpsertProduct,
        commands_pb2.UpsertProductRequest(
            request_id=new_id(),
            sku=sku,
            name="v2",
            unit_price=common_pb2.Money(currency_code="EUR", minor_units=1),
            expected_version=0,
        ),
    )
    assert again.code() == grpc.StatusCode.ABORTED and "version 1" in (again.details() or "")
    c.UpsertProduct(
        commands_pb2.UpsertProductRequest(
            request_id=new_id(),
            sku=sku,
            name="v2",
            unit_price=common_pb2.Money(currency_code="EUR", minor_units=2),
            expected_version=1,
        ),
        timeout=5,
    )

    stale = error_of(
        c.UpdateInventory,
        commands_pb2.UpdateInventoryRequest(request_id=new_id(), sku=sku, set_level=9, expected_version=1),
    )
    assert stale.code() == grpc.StatusCode.ABORTED and "version 2" in (stale.details() or "")
    updated = c.UpdateInventory(
        commands_pb2.UpdateInventoryRequest(request_id=new_id(), sku=sku, set_level=9, expected_version=2), timeout=5
    )
    assert (updated.version, updated.stock) == (3, 9)

    placed = c.PlaceOrder(order_request("c", (sku, 1)), timeout=5)
    wrong = error_of(
        c.CancelOrder,
        commands_pb2.CancelOrderRequest(request_id=new_id(), order_id=placed.order_id, expected_version=2),
    )
    assert wrong.code() == grpc.StatusCode.ABORTED and "version 1" in (wrong.details() or "")
    assert stock_of(stack, sku) == (8, 4)
    cancelled = c.CancelOrder(
        commands_pb2.CancelOrderRequest(request_id=new_id(), order_id=placed.order_id, expected_version=1), timeout=5
    )
    assert cancelled.version == 2
    assert stock_of(stack, sku) == (9, 5)


# --- 5. no oversell, no deadlock ----------------------------------------------------------------


def test_fifty_buyers_for_ten_units(stack: Stack) -> None:
    sku = new_sku("C")
    add_product(stack.commands, sku, stock=10)
    customer = f"rush-{new_id()}"

    def buy(_: int) -> grpc.StatusCode:
        try:
            stack.commands.PlaceOrder(order_request(customer, (sku, 1)), timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()

    with ThreadPoolExecutor(max_workers=50) as pool:
        outcomes = Counter(pool.map(buy, range(50)))
    assert outcomes == {grpc.StatusCode.OK: 10, grpc.StatusCode.FAILED_PRECONDITION: 40}
    assert stock_of(stack, sku)[0] == 0
    with psycopg.connect(libpq_url(stack.settings.write_database_url)) as conn:
        sold = conn.execute("SELECT coalesce(sum(quantity), 0) FROM order_items WHERE sku = %s", (sku,)).fetchone()
    assert sold is not None and sold[0] == 10


def test_multi_sku_orders_in_random_order_never_deadlock(stack: Stack) -> None:
    skus = [new_sku("C") for _ in range(5)]
    for sku in skus:
        add_product(stack.commands, sku, stock=60)
    rng = random.Random(20261126)
    orders = [rng.sample(skus, rng.randint(2, 5)) for _ in range(120)]
    customer = f"mix-{new_id()}"

    def buy(picked: list[str]) -> tuple[grpc.StatusCode, list[str]]:
        try:
            stack.commands.PlaceOrder(order_request(customer, *[(sku, 1) for sku in picked]), timeout=30)
            return grpc.StatusCode.OK, picked
        except grpc.RpcError as err:
            return err.code(), picked

    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(buy, orders))
    codes = Counter(code for code, _ in results)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION}, codes
    assert codes[grpc.StatusCode.OK] > 0
    sold = Counter(sku for code, picked in results if code == grpc.StatusCode.OK for sku in picked)
    for sku in skus:
        assert stock_of(stack, sku)[0] + sold[sku] == 60


def test_cancels_inventory_updates_and_upserts_racing_orders_keep_every_count(stack: Stack) -> None:
    """Every command at once on the same products: no deadlock, each order cancelled at most once, and
    each product's stock and version exactly what the successful commands add up to."""
    skus = [new_sku("C") for _ in range(4)]
    for sku in skus:
        add_product(stack.commands, sku, stock=1000)
    customer = f"all-{new_id()}"
    placed = [
        stack.commands.PlaceOrder(order_request(customer, *[(s, 1) for s in skus]), timeout=30) for _ in range(20)
    ]
    before = {sku: stock_of(stack, sku) for sku in skus}  # after the 20 orders
    created = new_sku("N")
    rng = random.Random(20261201)
    price = common_pb2.Money(currency_code="EUR", minor_units=100)
    jobs: list[tuple[str, object]] = [("cancel", p.order_id) for p in placed for _ in range(3)]  # 3 cancels each
    jobs += [("order", rng.sample(skus, rng.randint(1, 4))) for _ in range(40)]
    jobs += [("inventory", rng.choice(skus)) for _ in range(30)]
    jobs += [("upsert", created) for _ in range(10)]  # racing creations of one new product
    rng.shuffle(jobs)

    def run(job: tuple[str, object]) -> tuple[str, object, grpc.StatusCode, int]:
        kind, target = job
        try:
            if kind == "cancel":
                reply = stack.commands.CancelOrder(
                    commands_pb2.CancelOrderRequest(request_id=new_id(), order_id=str(target)), timeout=30
                )
            elif kind == "order":
                reply = stack.commands.PlaceOrder(order_request(customer, *[(s, 1) for s in target]), timeout=30)  # type: ignore[attr-defined]
            elif kind == "inventory":
                reply = stack.commands.UpdateInventory(
                    commands_pb2.UpdateInventoryRequest(request_id=new_id(), sku=str(target), delta=7), timeout=30
                )
            else:
                reply = stack.commands.UpsertProduct(
                    commands_pb2.UpsertProductRequest(request_id=new_id(), sku=str(target), name="n", unit_price=price),
                    timeout=30,
                )
            return kind, target, grpc.StatusCode.OK, reply.version
        except grpc.RpcError as err:
            return kind, target, err.code(), 0

    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(run, jobs))
    codes = Counter((kind, code) for kind, _, code, _ in results)
    assert {code for _, code in codes} <= {grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION}, codes
    assert codes[("cancel", grpc.StatusCode.OK)] == 20  # one per order, the other two refused
    assert codes[("upsert", grpc.StatusCode.OK)] == 10
    assert sorted(v for kind, _, code, v in results if kind == "upsert") == list(range(1, 11))
    for sku in skus:
        ordered = sum(
            1 for kind, t, code, _ in results if kind == "order" and code == grpc.StatusCode.OK and sku in cast(list, t)
        )
        restocked = sum(
            1 for kind, t, code, _ in results if kind == "inventory" and code == grpc.StatusCode.OK and t == sku
        )
        # stock: give the 20 first orders back, take the new ones, add 7 per update; a version per change
        stock, version = before[sku]
        assert stock_of(stack, sku) == (stock + 20 - ordered + 7 * restocked, version + 20 + ordered + restocked)
    assert stock_of(stack, created) == (0, 10)
