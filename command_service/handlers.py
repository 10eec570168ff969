"""Command handlers: write-database transactions, events written to the outbox in them.

CancelOrder, UpdateInventory and UpsertProduct run one transaction each, PlaceOrder one per group of
PlaceOrders (group commit: those that arrive while a transaction is in flight share the next one;
`command_service.grouping`, `CommandHandlers._place_orders`). Every transaction runs on the pooled
connection's psycopg driver connection in two round trips (pipeline mode), for one command through
`CommandHandlers._transact`:
  1. BEGIN, look up the request_id, and the command's reads, which lock what it changes;
  2. after the rule has been decided in Python on what those reads returned: the writes, the outbox
     rows and the request_id with its response (written once) as one statement (`one_statement`),
     COMMIT.
A request_id found stored, or taken by a concurrent request meanwhile, rolls everything back and
answers with the response the earlier identical request stored; a rule that fails (not found, version
conflict, not enough stock) raises between the two round trips, which rolls back too, so bad input
writes nothing. Nothing is published inside the transaction; the relay does that after commit. A
PlaceOrder group judges each order on its own (a failing rule rejects that order only) and writes
the accepted ones together.

Lock order, which keeps concurrent commands deadlock-free: an order row before product rows, and
product rows in ascending SKU order (every read that locks several products sorts them).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from google.protobuf.message import Message
from psycopg.types.json import Jsonb
from sqlalchemy.ext.asyncio import AsyncEngine

from command_service import domain
from command_service.grouping import Grouper, Pending
from orders import consistency
from orders.conversions import money, timestamp
from orders.db import driver_transaction, is_unavailable
from orders.errors import DomainError, FailedPrecondition, NotFound, RequestIdReused, VersionConflict
from orders.events import ORDER, PRODUCT, EventContext, OutgoingEvent, build_event
from orders.v1 import commands_pb2, events_pb2

R = TypeVar("R", bound=Message)
Statement = tuple[str, Sequence[Any]]
Rows = list[tuple[Any, ...]]


@dataclass(frozen=True)
class CommandContext:
    """Who asked: the request id (idempotency key, event causation), the correlation id and trace context."""

    request_id: str
    correlation_id: str
    traceparent: str = ""

    def events_at(self, moment: datetime) -> EventContext:
        return EventContext(
            occurred_at=moment,
            correlation_id=self.correlation_id,
            causation_id=self.request_id,
            traceparent=self.traceparent,
        )


@dataclass
class Decision:
    """What a command decided on its reads: the writes of its second round trip, its events, its answer."""

    response: Message
    events: list[OutgoingEvent]
    writes: list[Statement] = field(default_factory=list)


def request_hash(request: Message) -> bytes:
    """Fingerprint of a request's payload, request_id excluded (same payload → same hash)."""
    body = type(request)()
    body.CopyFrom(request)
    body.ClearField("request_id")  # type: ignore[arg-type]
    return hashlib.sha256(body.SerializeToString(deterministic=True)).digest()


# What an earlier request with this request_id stored, if any: read in round trip 1, answered again.
STORED_SQL = "SELECT command, request_hash, response FROM idempotency_keys WHERE request_id = %s"
# The request_id and its response, written once, in round trip 2. A concurrent request with the same
# request_id waits on the primary key for the first one's commit and then fails there.
STORE_SQL = "INSERT INTO idempotency_keys (request_id, command, request_hash, response) VALUES (%s, %s, %s, %s)"
IDEMPOTENCY_KEY = "idempotency_keys_pkey"
# PlaceOrder (a group of them, see `CommandHandlers._place_orders`): the products of every order of the
# group, locked in SKU order, then the request_ids stored meanwhile (read after the locks were granted:
# read committed, so it sees what a concurrent copy committed while this one waited for them).
LOCK_PRODUCTS_SQL = (
    "SELECT sku, name, unit_price_minor, currency, stock, version FROM products "
    "WHERE sku = ANY(%s) ORDER BY sku FOR UPDATE"
)
STORED_ANY_SQL = "SELECT request_id, command, request_hash, response FROM idempotency_keys WHERE request_id = ANY(%s)"
INSERT_ORDERS_SQL = (
    "INSERT INTO orders (id, customer_id, status, total_minor, currency, version, created_at, updated_at) "
    "SELECT o.id::uuid, o.customer_id, o.status, o.total, o.currency, 1, %s, %s "
    "FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[]) "
    "AS o(id, customer_id, status, total, currency)"
)
INSERT_ITEMS_SQL = (
    "INSERT INTO order_items (order_id, line_no, sku, name, quantity, unit_price_minor) "
    "SELECT i.order_id::uuid, i.line_no, i.sku, i.name, i.quantity, i.unit_price_minor "
    "FROM unnest(%s::text[], %s::int[], %s::text[], %s::text[], %s::bigint[], %s::bigint[]) "
    "AS i(order_id, line_no, sku, name, quantity, unit_price_minor)"
)
STORE_ALL_SQL = (
    "INSERT INTO idempotency_keys (request_id, command, request_hash, response) "
    "SELECT k.request_id, %s, k.request_hash, k.response FROM unnest(%s::text[], %b::bytea[], %b::bytea[]) "
    "AS k(request_id, request_hash, response)"
)
LOCK_ORDER_SQL = "SELECT status, version FROM orders WHERE id = %s FOR UPDATE"
# After the order row (lock order): its products in SKU order, with the units the order holds of each.
LOCK_ORDER_PRODUCTS_SQL = """
WITH held AS (SELECT sku, sum(quantity)::bigint AS quantity FROM order_items WHERE order_id = %s GROUP BY sku)
SELECT p.sku, p.stock, p.version, held.quantity FROM products p JOIN held USING (sku) ORDER BY p.sku FOR UPDATE OF p
"""
CANCEL_ORDER_SQL = "UPDATE orders SET status = %s, cancel_reason = %s, version = %s, updated_at = %s WHERE id = %s"
# Rows already locked by the first round trip: set them to exactly what the events say.
SET_STOCK_SQL = """
UPDATE products p SET stock = s.stock, version = s.version, updated_at = %s
  FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS s(sku, stock, version)
 WHERE p.sku = s.sku
"""
LOCK_PRODUCT_SQL = "SELECT stock, version FROM products WHERE sku = %s FOR UPDATE"
# Creates the product when missing (waiting for a concurrent creator); returns a row only when it did.
CREATE_PRODUCT_SQL = (
    "INSERT INTO products (sku, name, unit_price_minor, currency, stock, version, created_at, updated_at) "
    "VALUES (%s, %s, %s, %s, 0, 1, %s, %s) ON CONFLICT DO NOTHING RETURNING version"
)
UPDATE_PRODUCT_SQL = (
    "UPDATE products SET name = %s, unit_price_minor = %s, currency = %s, version = %s, updated_at = %s WHERE sku = %s"
)
# Binary parameters (%b): text-format bytea[] and jsonb[] arrays would be escaped element by element.
INSERT_OUTBOX_SQL = (
    "INSERT INTO outbox (event_id, subject, headers, payload) "
    "SELECT * FROM unnest(%b::uuid[], %b::text[], %b::jsonb[], %b::bytea[])"
)


def one_statement(statements: list[Statement]) -> Statement:
    """Several writes as one statement (each a data-modifying CTE), so that psycopg and PostgreSQL do
    their per-statement work once. The writes see the same snapshot and run in no defined order, which
    is sound only because no two of them change the same row (each command's writes go to different
    tables: the order, its items, products, outbox rows, the stored response); foreign keys are
    checked at the end of the statement, when all of them are done."""
    text = "WITH " + ", ".join(f"w{i} AS ({sql.strip()})" for i, (sql, _) in enumerate(statements)) + " SELECT 1"
    return text, [param for _, params in statements for param in params]


class _AlreadyStored(Exception):
    """The request_id is stored (by an earlier identical request, or a different one): roll back."""

    def __init__(self, stored: tuple[Any, ...]) -> None:
        super().__init__()
        self.stored = stored  # (command, request_hash, response)


def _is_request_id_taken(exc: psycopg.Error) -> bool:
    return isinstance(exc, psycopg.errors.UniqueViolation) and exc.diag.constraint_name == IDEMPOTENCY_KEY


def _outbox_rows(events: list[OutgoingEvent]) -> Statement:
    return (
        INSERT_OUTBOX_SQL,
        (
            [e.event_id for e in events],
            [e.subject for e in events],
            [Jsonb(e.headers) for e in events],
            [e.payload for e in events],
        ),
    )


def _check_available(quantities: dict[str, int], products: dict[str, list[Any]]) -> None:
    """Raise NOT_FOUND or FAILED_PRECONDITION for the first SKU, in SKU order, whose locked product
    (sku → [sku, name, price, currency, stock, version]) is missing or short of the quantity."""
    for sku in sorted(quantities):
        if (row := products.get(sku)) is None:
            raise NotFound(f"product {sku!r} is not in the catalog")
        if row[4] < quantities[sku]:
            raise FailedPrecondition(
                f"not enough stock for {sku!r}: {quantities[sku]} requested, {row[4]} available",
                "INSUFFICIENT_STOCK",
                sku,
            )


@dataclass
class _Placing:
    """A PlaceOrder waiting for its group's transaction."""

    request: commands_pb2.PlaceOrderRequest
    ctx: CommandContext
    digest: bytes


@dataclass
class _PlacedOrders:
    """The rows, events and stored responses of a group's accepted orders, written as one statement."""

    orders: list[tuple[Any, ...]] = field(default_factory=list)
    items: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[OutgoingEvent] = field(default_factory=list)
    stored: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    skus: set[str] = field(default_factory=set)

    def statement(self, products: dict[str, list[Any]], now: datetime) -> Statement:
        stock = sorted(products[sku] for sku in self.skus)
        return one_statement(
            [
                (SET_STOCK_SQL, (now, [p[0] for p in stock], [p[4] for p in stock], [p[5] for p in stock])),
                (INSERT_ORDERS_SQL, (now, now, *map(list, zip(*self.orders, strict=True)))),
                (INSERT_ITEMS_SQL, tuple(map(list, zip(*self.items, strict=True)))),
                _outbox_rows(self.events),
                # request_ids in sorted order: two groups (of two processes) holding copies of the same
                # two request_ids wait for each other's keys in one order, never crosswise.
                (STORE_ALL_SQL, ("PlaceOrder", *map(list, zip(*sorted(self.stored), strict=True)))),
            ]
        )


def _placed_before(placing: _Placing, stored: tuple[Any, ...] | None) -> commands_pb2.PlaceOrderResponse:
    """The response an earlier PlaceOrder with this request_id stored (RequestIdReused if it differs)."""
    return CommandHandlers._answer_again(
        placing.request, "PlaceOrder", placing.digest, commands_pb2.PlaceOrderResponse.FromString, stored
    )


class CommandHandlers:
    """The four commands against one write database. `on_commit` runs after each committed change."""

    def __init__(self, engine: AsyncEngine, on_commit: Callable[[], None] = lambda: None, group_max: int = 64) -> None:
        self._engine = engine
        self._on_commit = on_commit
        self._placing = Grouper(self._place_orders, group_max, retry_alone=lambda exc: not is_unavailable(exc))

    async def _transact(
        self,
        command: str,
        request: Message,
        parse: Callable[[bytes], R],
        reads: list[Statement],
        decide: Callable[[psycopg.AsyncConnection[Any], list[Rows]], Awaitable[Decision]],
    ) -> R:
        """Look up the request_id and run `reads` (round trip 1), let `decide` judge their rows and raise
        or return the writes, events and response, then write those, the outbox rows and the request_id
        with its response and commit (round trip 2).

        The invariants: one effect per request_id, nothing written when decide raises, the outbox rows
        in the same transaction as the change they describe. A request_id already stored is answered
        from what it stored. Two concurrent requests with one request_id both miss it in round trip 1;
        the second's insert of it waits for the first's commit and fails, so the second rolls back and
        answers from what the first stored. So does a second whose rule failed (say, the order it
        waited for was cancelled by the first): a failed rule looks for a stored request_id once more,
        in the same transaction (read committed: it sees what committed while this one waited).
        """
        request_id = request.request_id  # type: ignore[attr-defined]
        digest = request_hash(request)
        try:
            async with driver_transaction(self._engine) as conn:
                async with conn.pipeline():
                    earlier = await conn.execute(STORED_SQL, (request_id,))
                    cursors = [await conn.execute(sql, params) for sql, params in reads]
                if (stored := await earlier.fetchone()) is not None:
                    raise _AlreadyStored(stored)
                try:
                    decision = await decide(conn, [await cur.fetchall() for cur in cursors])
                except DomainError:
                    again = await conn.execute(STORED_SQL, (request_id,))
                    if (stored := await again.fetchone()) is not None:
                        raise _AlreadyStored(stored) from None
                    raise
                response = decision.response.SerializeToString()
                store = (STORE_SQL, (request_id, command, digest, response))
                async with conn.pipeline():
                    await conn.execute(*one_statement([*decision.writes, _outbox_rows(decision.events), store]))
                    await conn.commit()
        except _AlreadyStored as taken:
            stored = taken.stored
        except psycopg.Error as exc:
            if not _is_request_id_taken(exc):
                raise
            stored = await self._lookup(request_id)  # the failed transaction cannot read it
        else:
            self._on_commit()
            return decision.response  # type: ignore[return-value]
        return self._answer_again(request, command, digest, parse, stored)

    async def place_order(
        self, request: commands_pb2.PlaceOrderRequest, ctx: CommandContext
    ) -> commands_pb2.PlaceOrderResponse:
        """Reserve stock for every line (all or none), then record the order and its events, in the
        transaction of the next group of PlaceOrders (`_place_orders`): one at once when none is in
        flight, else together with those that arrived meanwhile."""
        domain.validate_place_order(request)
        placing = _Placing(request, ctx, request_hash(request))
        return await self._placing.submit(request.request_id, placing)  # type: ignore[no-any-return]

    async def _place_orders(self, group: list[Pending[_Placing]]) -> None:
        """Settle every PlaceOrder of the group in one transaction of two round trips:
          1. lock the products of all its orders in SKU order, then look their request_ids up;
          2. after each order was judged in Python, in arrival order, against the locked stock less what
             the orders before it took: one statement writing the stock, the accepted orders, their
             items, outbox rows and stored responses, and COMMIT.
        An order short of stock, of an unknown product or mixing currencies rejects itself only and
        takes nothing; a request_id found stored is answered from what it stored. The outcomes are
        settled after the commit. A failure of the transaction raises (nothing of it is written; the
        Grouper then tries each order alone); alone, a request_id taken by a concurrent copy meanwhile
        is answered from what that copy stored, as `_transact` does.

        Events of one product stay in version order: each accepted order takes the next version of
        every product it reserves, and its events follow those of the orders before it in the outbox.
        """
        now = datetime.now(UTC)
        skus = sorted({line.sku for pending in group for line in pending.request.request.lines})
        request_ids = [pending.key for pending in group]
        try:
            async with driver_transaction(self._engine) as conn:
                async with conn.pipeline():
                    locked = await conn.execute(LOCK_PRODUCTS_SQL, (skus,))
                    earlier = await conn.execute(STORED_ANY_SQL, (request_ids,))
                products = {row[0]: list(row) for row in await locked.fetchall()}
                stored = {row[0]: row[1:] for row in await earlier.fetchall()}
                placed = _PlacedOrders()
                outcomes: list[Message | Exception] = []
                for pending in group:
                    placing = pending.request
                    try:
                        if pending.key in stored:
                            outcomes.append(_placed_before(placing, stored[pending.key]))
                        else:
                            outcomes.append(self._placed(placing, products, now, placed))
                    except DomainError as exc:
                        outcomes.append(exc)
                if placed.orders:
                    async with conn.pipeline():
                        await conn.execute(*placed.statement(products, now))
                        await conn.commit()
        except psycopg.Error as exc:
            if len(group) > 1 or not _is_request_id_taken(exc):
                raise
            (pending,) = group
            try:
                outcomes = [_placed_before(pending.request, await self._lookup(pending.key))]
            except DomainError as reused:
                outcomes = [reused]
        else:
            if placed.orders:
                self._on_commit()
        for pending, outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, Exception):
                pending.fail(outcome)
            else:
                pending.settle(outcome)

    def _placed(
        self, placing: _Placing, products: dict[str, list[Any]], now: datetime, placed: _PlacedOrders
    ) -> commands_pb2.PlaceOrderResponse:
        """Judge one order against the locked products and, when it passes, take its quantities from
        them and add its rows, events and response to `placed`; raises the rule it fails."""
        request, ctx = placing.request, placing.ctx
        quantities = {line.sku: line.quantity for line in request.lines}
        _check_available(quantities, products)
        lines = [
            domain.PricedLine(
                sku=line.sku,
                name=products[line.sku][1],
                quantity=line.quantity,
                unit_price_minor=products[line.sku][2],
                currency=products[line.sku][3],
            )
            for line in request.lines
        ]
        total, currency = domain.order_total(lines)
        if currency is None:
            raise FailedPrecondition(
                "all products of one order must be priced in the same currency", "CURRENCY_MISMATCH", "lines"
            )
        reserved: dict[str, tuple[Any, ...]] = {}
        for sku in sorted(quantities):  # each product's next version, its stock after this order
            row = products[sku]
            row[4] -= quantities[sku]
            row[5] += 1
            reserved[sku] = tuple(row)
        order_id = str(uuid.uuid4())
        meta = ctx.events_at(now)
        order_placed = events_pb2.OrderPlaced(
            customer_id=request.customer_id,
            lines=[
                events_pb2.OrderLine(
                    sku=line.sku,
                    name=line.name,
                    quantity=line.quantity,
                    unit_price=money(line.unit_price_minor, line.currency),
                )
                for line in lines
            ],
            total=money(total, currency),
            placed_at=timestamp(now),
        )
        placed.events.append(build_event(meta, ORDER, order_id, 1, order_placed=order_placed))
        placed.events += [
            build_event(
                meta,
                PRODUCT,
                sku,
                row[5],
                stock_reserved=events_pb2.StockReserved(order_id=order_id, quantity=quantities[sku], stock=row[4]),
            )
            for sku, row in reserved.items()
        ]
        versions = {(ORDER, order_id): 1} | {(PRODUCT, sku): row[5] for sku, row in reserved.items()}
        response = commands_pb2.PlaceOrderResponse(
            order_id=order_id, version=1, consistency_token=consistency.encode(versions), total=money(total, currency)
        )
        placed.orders.append((order_id, request.customer_id, domain.ORDER_PLACED, total, currency))
        placed.items += [
            (order_id, i, line.sku, line.name, line.quantity, line.unit_price_minor) for i, line in enumerate(lines)
        ]
        placed.stored.append((request.request_id, placing.digest, response.SerializeToString()))
        placed.skus.update(reserved)
        return response

    async def _lookup(self, request_id: str) -> tuple[Any, ...] | None:
        """(command, request_hash, response) stored for request_id, read on a connection of its own."""
        async with driver_transaction(self._engine) as conn:
            cur = await conn.execute(STORED_SQL, (request_id,))
            return await cur.fetchone()

    @staticmethod
    def _answer_again(
        request: Message, command: str, digest: bytes, parse: Callable[[bytes], R], stored: tuple[Any, ...] | None
    ) -> R:
        """The response an earlier identical request stored; RequestIdReused for a different request."""
        if stored is None or stored[0] != command or bytes(stored[1]) != digest or stored[2] is None:
            raise RequestIdReused(f"request_id {request.request_id!r} was already used for a different request")  # type: ignore[attr-defined]
        return parse(bytes(stored[2]))

    async def cancel_order(
        self, request: commands_pb2.CancelOrderRequest, ctx: CommandContext
    ) -> commands_pb2.CancelOrderResponse:
        """Cancel a PLACED order and give its units back to stock."""
        domain.validate_cancel_order(request)
        order_id = request.order_id.lower()

        async def decide(conn: psycopg.AsyncConnection[Any], rows: list[Rows]) -> Decision:
            order, held = rows
            if not order:
                raise NotFound(f"order {order_id} does not exist")
            status, current = order[0]
            if request.HasField("expected_version") and request.expected_version != current:
                raise VersionConflict(f"order {order_id}", request.expected_version, current)
            if status != domain.ORDER_PLACED:
                raise FailedPrecondition(
                    f"order {order_id} is {status}, only a PLACED order can be cancelled",
                    "ORDER_NOT_PLACED",
                    f"orders/{order_id}",
                )
            now = datetime.now(UTC)
            version = current + 1
            meta = ctx.events_at(now)
            cancelled = events_pb2.OrderCancelled(reason=request.reason, cancelled_at=timestamp(now))
            events = [build_event(meta, ORDER, order_id, version, order_cancelled=cancelled)]
            released = [
                (sku, stock + quantity, product_version + 1, quantity) for sku, stock, product_version, quantity in held
            ]
            events += [
                build_event(
                    meta,
                    PRODUCT,
                    sku,
                    new_version,
                    stock_released=events_pb2.StockReleased(order_id=order_id, quantity=quantity, stock=stock),
                )
                for sku, stock, new_version, quantity in released  # ascending SKU order
            ]
            versions = {(ORDER, order_id): version} | {(PRODUCT, r[0]): r[2] for r in released}
            response = commands_pb2.CancelOrderResponse(
                order_id=order_id, version=version, consistency_token=consistency.encode(versions)
            )
            writes: list[Statement] = [
                (CANCEL_ORDER_SQL, (domain.ORDER_CANCELLED, request.reason, version, now, order_id)),
                (SET_STOCK_SQL, (now, [r[0] for r in released], [r[1] for r in released], [r[2] for r in released])),
            ]
            return Decision(response, events, writes)

        reads: list[Statement] = [(LOCK_ORDER_SQL, (order_id,)), (LOCK_ORDER_PRODUCTS_SQL, (order_id,))]
        return await self._transact("CancelOrder", request, commands_pb2.CancelOrderResponse.FromString, reads, decide)

    async def update_inventory(
        self, request: commands_pb2.UpdateInventoryRequest, ctx: CommandContext
    ) -> commands_pb2.UpdateInventoryResponse:
        """Change stock by a delta or to a level; stock never goes below zero."""
        domain.validate_update_inventory(request)
        sku = request.sku

        async def decide(conn: psycopg.AsyncConnection[Any], rows: list[Rows]) -> Decision:
            if not rows[0]:
                raise NotFound(f"product {sku!r} is not in the catalog")
            stock, current = rows[0][0]
            if request.HasField("expected_version") and request.expected_version != current:
                raise VersionConflict(f"product {sku!r}", request.expected_version, current)
            new_stock = stock + request.delta if request.WhichOneof("change") == "delta" else request.set_level
            if new_stock < 0:
                raise FailedPrecondition(
                    f"stock of {sku!r} would become {new_stock}; it is {stock}", "INSUFFICIENT_STOCK", sku
                )
            if new_stock > domain.MAX_STOCK:
                raise FailedPrecondition(f"stock of {sku!r} would exceed {domain.MAX_STOCK}", "STOCK_LIMIT", sku)
            now = datetime.now(UTC)
            version = current + 1
            adjusted = events_pb2.InventoryAdjusted(delta=new_stock - stock, stock=new_stock)
            event = build_event(ctx.events_at(now), PRODUCT, sku, version, inventory_adjusted=adjusted)
            response = commands_pb2.UpdateInventoryResponse(
                sku=sku,
                version=version,
                stock=new_stock,
                consistency_token=consistency.encode({(PRODUCT, sku): version}),
            )
            return Decision(response, [event], [(SET_STOCK_SQL, (now, [sku], [new_stock], [version]))])

        return await self._transact(
            "UpdateInventory",
            request,
            commands_pb2.UpdateInventoryResponse.FromString,
            [(LOCK_PRODUCT_SQL, (sku,))],
            decide,
        )

    async def upsert_product(
        self, request: commands_pb2.UpsertProductRequest, ctx: CommandContext
    ) -> commands_pb2.UpsertProductResponse:
        """Create a product (version 1, no stock) or change its name and price."""
        domain.validate_upsert_product(request)
        sku, price = request.sku, request.unit_price
        now = datetime.now(UTC)

        async def decide(conn: psycopg.AsyncConnection[Any], rows: list[Rows]) -> Decision:
            created, (stock, locked_version) = bool(rows[0]), rows[1][0]
            current = 0 if created else locked_version
            if request.HasField("expected_version") and request.expected_version != current:
                raise VersionConflict(f"product {sku!r}", request.expected_version, current)
            version = current + 1
            writes: list[Statement] = []
            if not created:
                writes.append(
                    (UPDATE_PRODUCT_SQL, (request.name, price.minor_units, price.currency_code, version, now, sku))
                )
            upserted = events_pb2.ProductUpserted(
                name=request.name, unit_price=money(price.minor_units, price.currency_code), stock=stock
            )
            event = build_event(ctx.events_at(now), PRODUCT, sku, version, product_upserted=upserted)
            response = commands_pb2.UpsertProductResponse(
                sku=sku, version=version, consistency_token=consistency.encode({(PRODUCT, sku): version})
            )
            return Decision(response, [event], writes)

        reads: list[Statement] = [
            (CREATE_PRODUCT_SQL, (sku, request.name, price.minor_units, price.currency_code, now, now)),
            (LOCK_PRODUCT_SQL, (sku,)),
        ]
        return await self._transact(
            "UpsertProduct", request, commands_pb2.UpsertProductResponse.FromString, reads, decide
        )
