"""Thousands of random and adversarial requests to every RPC: each answer is OK or a clean client error,
the servers stay up, and the databases hold exactly what the accepted commands wrote.

A model follows every accepted command (stock per product, status per order); refused ones must
change nothing, so at the end the write database must equal the model, and the read model must
equal the write database.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orders.db import libpq_url
from orders.v1 import commands_pb2, common_pb2, queries_pb2
from tests.support import Stack, add_product, eventually, new_sku

NASTY = [
    "",
    " ",
    "'; DROP TABLE orders; --",
    "' OR '1'='1",
    "$(rm -rf /)",
    "`id`",
    "a\x00b",
    "%s%n%x",
    "../../etc/passwd",
    "\u202eevil",
    "🙂" * 40,
    "Ω" * 200,
    "x" * 129,
    "x" * 5000,
    "\\",
    "%",
    "_",
    "SKU-\n1",
]
CLIENT_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
INT64 = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 2, 10**9, 10**12, 2**31, 2**63 - 1, -(2**63)]),
)
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(NASTY))


def maybe(strategy: st.SearchStrategy[Any], default: Any = "") -> st.SearchStrategy[Any]:
    """The field's default half of the time, so that a request carries one or two hostile fields at once."""
    return st.one_of(st.just(default), strategy)


@dataclass
class Model:
    """What the accepted commands must have left in the write database."""

    stock: dict[str, int] = field(default_factory=dict)
    orders: dict[str, tuple[str, list[tuple[str, int]]]] = field(default_factory=dict)  # id → (status, lines)
    answers: dict[str, tuple[bytes, Any]] = field(default_factory=dict)  # request id → (request, response)
    codes: dict[str, int] = field(default_factory=dict)

    def seen(self, method: str, code: grpc.StatusCode) -> None:
        key = f"{method} {code.name}"
        self.codes[key] = self.codes.get(key, 0) + 1


def token_for(versions: list[list[Any]]) -> str:
    return base64.urlsafe_b64encode(json.dumps(versions).encode()).rstrip(b"=").decode()


def page_token(state: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(state).encode()).decode().rstrip("=")


EMPTY_QUERY = hashlib.sha256(b"" + queries_pb2.OrderFilter().SerializeToString(deterministic=True)).hexdigest()[:16]


def call(stack: Stack, method: str, request: Any, timeout: float = 5) -> tuple[grpc.StatusCode, Any]:
    stub = stack.commands if hasattr(stack.commands, method) else stack.queries
    try:
        reply = getattr(stub, method)(request, timeout=timeout)
        if method in ("ListOrderSummaries", "WatchOrderSummaries"):
            reply = [message for _, message in zip(range(3), reply, strict=False)]
        return grpc.StatusCode.OK, reply
    except grpc.RpcError as err:
        return err.code(), err


def test_hostile_requests_change_nothing_they_should_not(stack: Stack) -> None:
    skus = [new_sku("H") for _ in range(3)]
    model = Model()
    for sku in skus:
        add_product(stack.commands, sku, stock=50)
        model.stock[sku] = 50
    sku_values = st.one_of(
        st.sampled_from(skus), TEXT, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,70}", fullmatch=True)
    )
    order_ids = st.one_of(st.uuids().map(str), TEXT, st.builds(lambda: next(iter(model.orders), str(uuid.uuid4()))))
    request_ids = st.one_of(
        st.uuids().map(str), TEXT, st.builds(lambda: next(reversed(model.answers), str(uuid.uuid4())))
    )
    huge = st.one_of(INT64, st.integers(2**63, 2**80), st.floats(allow_nan=True), st.none(), TEXT)
    tokens = st.one_of(
        st.just(""),
        TEXT,
        st.binary(max_size=64).map(lambda b: base64.urlsafe_b64encode(b).decode()),
        st.lists(st.tuples(st.sampled_from(["o", "p", "x"]), TEXT, huge).map(list), max_size=3).map(token_for),
        # page tokens with the right shape (the fingerprint of the empty query) and hostile values
        st.fixed_dictionaries(
            {"q": st.just(EMPTY_QUERY), "r": huge, "t": st.one_of(TEXT, st.datetimes().map(str)), "i": TEXT}
        ).map(page_token),
        st.fixed_dictionaries({"after": st.one_of(TEXT, huge)}).map(page_token),
    )
    page_sizes = st.one_of(st.just(0), st.integers(1, 1000), st.integers(-(2**31), 2**31 - 1))
    timestamps = st.builds(timestamp_pb2.Timestamp, seconds=INT64, nanos=st.integers(-(2**31), 2**31 - 1))
    lines = st.lists(st.builds(commands_pb2.PlaceOrderLine, sku=sku_values, quantity=INT64), max_size=4) | st.lists(
        st.builds(commands_pb2.PlaceOrderLine, sku=st.just("A"), quantity=st.just(1)), min_size=101, max_size=105
    )
    money = st.builds(common_pb2.Money, currency_code=st.one_of(st.just("EUR"), TEXT), minor_units=INT64)
    order_filter = st.just(queries_pb2.OrderFilter()) | st.builds(
        queries_pb2.OrderFilter,
        customer_id=TEXT,
        status=st.integers(-5, 2**31 - 1),
        placed_after=timestamps,
        placed_before=timestamps,
    )

    fresh_ids = st.uuids().map(str)
    valid_lines = st.lists(st.sampled_from(skus), min_size=1, max_size=3, unique=True).flatmap(
        lambda chosen: st.tuples(*[st.integers(1, 3) for _ in chosen]).map(
            lambda quantities: [
                commands_pb2.PlaceOrderLine(sku=s, quantity=q) for s, q in zip(chosen, quantities, strict=True)
            ]
        )
    )
    known_orders = st.builds(
        lambda n: list(model.orders)[n % len(model.orders)] if model.orders else str(uuid.uuid4()),
        st.integers(0, 10**6),
    )
    valid = st.one_of(
        st.tuples(
            st.just("PlaceOrder"),
            st.builds(
                commands_pb2.PlaceOrderRequest,
                request_id=fresh_ids,
                customer_id=st.sampled_from(["h1", "h2"]),
                lines=valid_lines,
            ),
        ),
        st.tuples(
            st.just("CancelOrder"),
            st.builds(
                commands_pb2.CancelOrderRequest,
                request_id=fresh_ids,
                order_id=known_orders,
                reason=st.sampled_from(["", "fuzz"]),
            ),
        ),
        st.tuples(
            st.just("UpdateInventory"),
            st.builds(
                commands_pb2.UpdateInventoryRequest,
                request_id=fresh_ids,
                sku=st.sampled_from(skus),
                delta=st.integers(-5, 20).filter(bool),
            ),
        ),
        st.tuples(
            st.just("UpsertProduct"),
            st.builds(
                commands_pb2.UpsertProductRequest,
                request_id=fresh_ids,
                sku=st.from_regex(r"ZF-[A-Za-z0-9]{8}", fullmatch=True),
                name=st.text(min_size=1, max_size=30).filter(lambda t: t.strip() and t.isprintable()),
                unit_price=st.builds(common_pb2.Money, currency_code=st.just("EUR"), minor_units=st.integers(0, 10**6)),
            ),
        ),
    )
    hostile = st.one_of(
        st.tuples(
            st.just("PlaceOrder"),
            st.builds(commands_pb2.PlaceOrderRequest, request_id=request_ids, customer_id=TEXT, lines=lines),
        ),
        st.tuples(
            st.just("CancelOrder"),
            st.builds(
                commands_pb2.CancelOrderRequest,
                request_id=request_ids,
                order_id=order_ids,
                reason=TEXT,
                expected_version=st.one_of(st.none(), INT64),
            ),
        ),
        st.tuples(
            st.just("UpdateInventory"),
            st.one_of(
                st.builds(commands_pb2.UpdateInventoryRequest, request_id=request_ids, sku=sku_values, delta=INT64),
                st.builds(commands_pb2.UpdateInventoryRequest, request_id=request_ids, sku=sku_values, set_level=INT64),
                st.builds(commands_pb2.UpdateInventoryRequest, request_id=request_ids, sku=sku_values),
            ),
        ),
        st.tuples(
            st.just("UpsertProduct"),
            st.builds(
                commands_pb2.UpsertProductRequest,
                request_id=request_ids,
                sku=st.one_of(st.just("H-fuzz-new"), TEXT, st.from_regex(r"Z[A-Za-z0-9_-]{0,10}", fullmatch=True)),
                name=TEXT,
                unit_price=money,
                expected_version=st.one_of(st.none(), INT64),
            ),
        ),
        st.tuples(
            st.just("GetOrderSummary"),
            st.builds(queries_pb2.GetOrderSummaryRequest, order_id=order_ids, consistency_token=maybe(tokens)),
        ),
        st.tuples(
            st.just("ListOrderSummaries"),
            st.builds(
                queries_pb2.ListOrderSummariesRequest, filter=order_filter, sort_order=maybe(st.integers(-3, 5), 0)
            ),
        ),
        st.tuples(
            st.just("SearchOrders"),
            st.builds(
                queries_pb2.SearchOrdersRequest,
                query=maybe(TEXT),
                filter=maybe(order_filter, queries_pb2.OrderFilter()),
                page_size=maybe(page_sizes, 0),
                page_token=maybe(tokens),
                consistency_token=maybe(tokens),
            ),
        ),
        st.tuples(
            st.just("ListProducts"),
            st.builds(
                queries_pb2.ListProductsRequest,
                page_size=maybe(page_sizes, 0),
                page_token=maybe(tokens),
                in_stock_only=st.booleans(),
                name_prefix=maybe(TEXT),
            ),
        ),
        st.tuples(
            st.just("WatchOrderSummaries"),
            st.builds(
                queries_pb2.WatchOrderSummariesRequest,
                order_ids=st.lists(order_ids, max_size=3),
                customer_id=TEXT,
                include_snapshot=st.booleans(),
                after_sequence=INT64.filter(lambda n: n >= 0),
                consistency_token=tokens,
            ),
        ),
    )

    requests = st.one_of(valid, hostile)

    def apply(method: str, request: Any, reply: Any) -> None:
        """Follow an accepted command in the model (a repeated request id must answer the same, once)."""
        wire = request.SerializeToString()
        previous = model.answers.get(request.request_id)
        if previous is not None:
            assert previous == (wire, reply.SerializeToString()), "an idempotent retry answered differently"
            return
        model.answers[request.request_id] = (wire, reply.SerializeToString())
        if method == "PlaceOrder":
            order_lines = [(line.sku, line.quantity) for line in request.lines]
            for sku, quantity in order_lines:
                model.stock[sku] -= quantity
            model.orders[reply.order_id] = ("PLACED", order_lines)
        elif method == "CancelOrder":
            status, order_lines = model.orders[request.order_id]
            assert status == "PLACED"
            for sku, quantity in order_lines:
                model.stock[sku] += quantity
            model.orders[request.order_id] = ("CANCELLED", order_lines)
        elif method == "UpdateInventory":
            before = model.stock.get(request.sku, 0)
            expected = before + request.delta if request.WhichOneof("change") == "delta" else request.set_level
            assert reply.stock == expected
            model.stock[request.sku] = expected
        elif method == "UpsertProduct":
            model.stock.setdefault(request.sku, 0)

    @settings(
        max_examples=700,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(st.lists(requests, min_size=1, max_size=8))
    def exchange(batch: list[tuple[str, Any]]) -> None:
        for method, request in batch:
            waits = bool(getattr(request, "consistency_token", ""))
            code, reply = call(stack, method, request, timeout=0.3 if method == "WatchOrderSummaries" or waits else 5)
            model.seen(method, code)
            allowed = set(CLIENT_ERRORS)
            if method == "WatchOrderSummaries":
                allowed.add(grpc.StatusCode.DEADLINE_EXCEEDED)  # a valid watch stays open until the deadline
            if waits:  # a well-formed token naming versions nobody wrote: the wait gives up
                allowed |= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
            assert code in allowed, f"{method} answered {code.name} to {request!r}: {reply}"
            if code == grpc.StatusCode.OK and hasattr(request, "request_id"):
                apply(method, request, reply)

    exchange()

    raw_methods = [
        "/orders.v1.CommandService/PlaceOrder",
        "/orders.v1.CommandService/UpsertProduct",
        "/orders.v1.QueryService/GetOrderSummary",
        "/orders.v1.QueryService/ListProducts",
    ]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.sampled_from(raw_methods), st.binary(max_size=300))
    def raw_bytes(method: str, payload: bytes) -> None:
        with grpc.insecure_channel(
            stack.settings.command_addr if "Command" in method else stack.settings.query_addr
        ) as ch:
            try:
                ch.unary_unary(method)(payload, timeout=5)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
        model.seen(method.rpartition("/")[2] + " (raw)", code)
        assert code in CLIENT_ERRORS, f"{method} answered {code.name} to raw bytes {payload!r}"
        assert code != grpc.StatusCode.OK or "Command" not in method or not payload  # bytes that parse are refused

    raw_bytes()

    with grpc.insecure_channel(stack.settings.command_addr) as ch:  # a request over the 1 MB limit
        with pytest.raises(grpc.RpcError) as too_big:
            ch.unary_unary("/orders.v1.CommandService/PlaceOrder")(b"\x0a" + b"\xff" * (2 * 1024 * 1024), timeout=10)
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # The servers are still up, and the databases hold exactly what the accepted commands wrote.
    assert all(proc.alive() for proc in stack.processes.values())
    with psycopg.connect(libpq_url(stack.settings.write_database_url)) as conn:
        stock: dict[str, int] = dict(
            conn.execute("SELECT sku, stock FROM products WHERE sku = ANY(%s)", (list(model.stock),)).fetchall()
        )
        statuses: dict[str, str] = dict(
            conn.execute(
                "SELECT id::text, status FROM orders WHERE id = ANY(%s::uuid[])", (list(model.orders),)
            ).fetchall()
        )
        claimed = conn.execute(
            "SELECT count(*) FROM idempotency_keys WHERE request_id = ANY(%s)", (list(model.answers),)
        ).fetchone()
    assert stock == model.stock
    assert statuses == {order_id: status for order_id, (status, _) in model.orders.items()}
    assert claimed == (len(model.answers),)
    accepted = sum(n for key, n in model.codes.items() if key.endswith(" OK"))
    print(f"\n{sum(model.codes.values())} requests, {accepted} answered OK; by RPC and status: {model.codes}")
    assert sum(model.codes.values()) >= 2000
    eventually(
        lambda: read_stock(stack, list(model.stock)) == model.stock, 20, "the read model caught up with the model"
    )


def read_stock(stack: Stack, skus: list[str]) -> dict[str, int]:
    with psycopg.connect(libpq_url(stack.settings.read_database_url)) as conn:
        return dict(conn.execute("SELECT sku, stock FROM product_views WHERE sku = ANY(%s)", (skus,)).fetchall())
