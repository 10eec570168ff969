"""Command handlers: one write-database transaction each, events written to the outbox in it.

Every handler follows the same shape inside one `engine.begin()`:
  1. claim the request_id (or return the stored response of an earlier identical request),
  2. apply the rule with row-level guards (conditional updates, SELECT … FOR UPDATE),
  3. bump versions, insert outbox rows and store the response, commit.
Nothing is published inside the transaction; the relay does that after commit.

Lock order, which keeps concurrent commands deadlock-free: an order row before product rows, and
product rows in ascending SKU order.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa
from google.protobuf.message import Message
from psycopg.types.json import Jsonb
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from command_service import domain
from command_service.schema import idempotency_keys, order_items, orders, outbox, products
from orders import consistency
from orders.db import driver_transaction
from orders.errors import FailedPrecondition, NotFound, RequestIdReused, VersionConflict
from orders.events import ORDER, PRODUCT, EventContext, OutgoingEvent, build_event, timestamp
from orders.v1 import commands_pb2, common_pb2, events_pb2

R = TypeVar("R", bound=Message)


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


def request_hash(request: Message) -> bytes:
    """Fingerprint of a request's payload, request_id excluded (same payload → same hash)."""
    body = type(request)()
    body.CopyFrom(request)
    body.ClearField("request_id")  # type: ignore[arg-type]
    return hashlib.sha256(body.SerializeToString(deterministic=True)).digest()


async def _claim(conn: AsyncConnection, command: str, request: Message, parse: Callable[[bytes], R]) -> R | None:
    """Claim request_id for this transaction, or return the response an identical request stored.

    The insert waits for a concurrent transaction holding the same request_id, so two racing
    identical requests yield one effect and one stored response.
    """
    request_id = request.request_id  # type: ignore[attr-defined]
    digest = request_hash(request)
    claimed = await conn.execute(
        pg_insert(idempotency_keys)
        .values(request_id=request_id, command=command, request_hash=digest)
        .on_conflict_do_nothing()
        .returning(idempotency_keys.c.request_id)
    )
    if claimed.first() is not None:
        return None
    row = (
        await conn.execute(
            sa.select(idempotency_keys.c.command, idempotency_keys.c.request_hash, idempotency_keys.c.response).where(
                idempotency_keys.c.request_id == request_id
            )
        )
    ).one()
    if row.command != command or bytes(row.request_hash) != digest or row.response is None:
        raise RequestIdReused(f"request_id {request_id!r} was already used for a different request")
    return parse(bytes(row.response))


async def _finish(conn: AsyncConnection, request_id: str, events: list[OutgoingEvent], response: Message) -> None:
    await conn.execute(
        outbox.insert(),
        [dict(event_id=e.event_id, subject=e.subject, headers=e.headers, payload=e.payload) for e in events],
    )
    await conn.execute(
        idempotency_keys.update()
        .where(idempotency_keys.c.request_id == request_id)
        .values(response=response.SerializeToString())
    )


CLAIM_SQL = (
    "INSERT INTO idempotency_keys (request_id, command, request_hash) VALUES (%s, %s, %s) "
    "ON CONFLICT DO NOTHING RETURNING request_id"
)
# Locks the wanted products in SKU order (a FOR UPDATE CTE is materialized before the update reads it),
# then takes the quantities where there is enough; a product short of stock returns no row.
RESERVE_SQL = """
WITH wanted AS (SELECT * FROM unnest(%s::text[], %s::bigint[]) AS w(sku, quantity)),
locked AS (SELECT p.sku FROM products p JOIN wanted USING (sku) ORDER BY p.sku FOR UPDATE OF p)
UPDATE products p
   SET stock = p.stock - w.quantity, version = p.version + 1, updated_at = %s
  FROM wanted w
 WHERE p.sku = w.sku AND p.stock >= w.quantity AND p.sku IN (SELECT sku FROM locked)
RETURNING p.sku, p.name, p.unit_price_minor, p.currency, p.stock, p.version
"""
INSERT_ORDER_SQL = (
    "INSERT INTO orders (id, customer_id, status, total_minor, currency, version, created_at, updated_at) "
    "VALUES (%s, %s, %s, %s, %s, 1, %s, %s)"
)
INSERT_ITEMS_SQL = (
    "INSERT INTO order_items (order_id, line_no, sku, name, quantity, unit_price_minor) "
    "SELECT %s, * FROM unnest(%s::int[], %s::text[], %s::text[], %s::bigint[], %s::bigint[])"
)
INSERT_OUTBOX_SQL = (
    "INSERT INTO outbox (event_id, subject, headers, payload) "
    "SELECT * FROM unnest(%s::uuid[], %s::text[], %s::jsonb[], %s::bytea[])"
)
STORE_RESPONSE_SQL = "UPDATE idempotency_keys SET response = %s WHERE request_id = %s"


class _AlreadyClaimed(Exception):
    """The request_id is taken (by an earlier identical request, or a different one): roll back."""


async def _insert_outbox(conn: psycopg.AsyncConnection[Any], events: list[OutgoingEvent]) -> None:
    await conn.execute(
        INSERT_OUTBOX_SQL,
        (
            [e.event_id for e in events],
            [e.subject for e in events],
            [Jsonb(e.headers) for e in events],
            [e.payload for e in events],
        ),
    )


async def _explain_short_reservation(
    conn: psycopg.AsyncConnection[Any], skus: list[str], quantities: dict[str, int], reserved: dict[str, Any]
) -> None:
    """Raise NOT_FOUND or FAILED_PRECONDITION for the first SKU (in SKU order) that could not be reserved."""
    cur = await conn.execute("SELECT sku, stock FROM products WHERE sku = ANY(%s)", (skus,))
    stock = dict(await cur.fetchall())
    for sku in skus:
        if sku in reserved:
            continue
        if sku not in stock:
            raise NotFound(f"product {sku!r} is not in the catalog")
        raise FailedPrecondition(
            f"not enough stock for {sku!r}: {quantities[sku]} requested, {stock[sku]} available",
            "INSUFFICIENT_STOCK",
            sku,
        )


def _money(minor: int, currency: str) -> common_pb2.Money:
    return common_pb2.Money(currency_code=currency, minor_units=minor)


class CommandHandlers:
    """The four commands against one write database. `on_commit` runs after each committed change."""

    def __init__(self, engine: AsyncEngine, on_commit: Callable[[], None] = lambda: None) -> None:
        self._engine = engine
        self._on_commit = on_commit

    async def place_order(
        self, request: commands_pb2.PlaceOrderRequest, ctx: CommandContext
    ) -> commands_pb2.PlaceOrderResponse:
        """Reserve stock for every line (all or none), then record the order and its events.

        The hottest command, so it runs on the driver connection in two round trips (psycopg pipeline
        mode): (1) BEGIN, claim the request_id, reserve every line in one statement that locks the
        products in SKU order; (2) the order, its items, the outbox rows, the stored response, COMMIT.
        The invariants are those of the other commands: all lines or none (a reservation short of
        any line rolls everything back), no overselling (`stock >= quantity` is re-checked on the
        locked row), one effect per request_id (a claim that conflicts rolls back and answers with
        the stored response).
        """
        domain.validate_place_order(request)
        quantities = {line.sku: line.quantity for line in request.lines}
        skus = sorted(quantities)  # ascending SKU order: no deadlock between orders
        digest = request_hash(request)
        now = datetime.now(UTC)
        try:
            async with driver_transaction(self._engine) as conn:
                async with conn.pipeline():
                    claim = await conn.execute(CLAIM_SQL, (request.request_id, "PlaceOrder", digest))
                    reserve = await conn.execute(RESERVE_SQL, (skus, [quantities[s] for s in skus], now))
                if await claim.fetchone() is None:
                    raise _AlreadyClaimed
                reserved = {row[0]: row for row in await reserve.fetchall()}
                if len(reserved) < len(skus):
                    await _explain_short_reservation(conn, skus, quantities, reserved)
                response, order_row, items, events = self._placed(request, ctx, reserved, quantities, now)
                async with conn.pipeline():
                    await conn.execute(INSERT_ORDER_SQL, order_row)
                    await conn.execute(INSERT_ITEMS_SQL, items)
                    await _insert_outbox(conn, events)
                    await conn.execute(STORE_RESPONSE_SQL, (response.SerializeToString(), request.request_id))
                    await conn.commit()
        except _AlreadyClaimed:
            return await self._stored(request, "PlaceOrder", digest, commands_pb2.PlaceOrderResponse.FromString)
        self._on_commit()
        return response

    def _placed(
        self,
        request: commands_pb2.PlaceOrderRequest,
        ctx: CommandContext,
        reserved: dict[str, tuple[Any, ...]],
        quantities: dict[str, int],
        now: datetime,
    ) -> tuple[commands_pb2.PlaceOrderResponse, tuple[Any, ...], tuple[Any, ...], list[OutgoingEvent]]:
        """The order's rows, events and response, from the reserved products (sku, name, price, currency,
        stock, version)."""
        order_id = str(uuid.uuid4())
        lines = [
            domain.PricedLine(
                sku=line.sku,
                name=reserved[line.sku][1],
                quantity=line.quantity,
                unit_price_minor=reserved[line.sku][2],
                currency=reserved[line.sku][3],
            )
            for line in request.lines
        ]
        total, currency = domain.order_total(lines)
        if currency is None:
            raise FailedPrecondition(
                "all products of one order must be priced in the same currency", "CURRENCY_MISMATCH", "lines"
            )
        meta = ctx.events_at(now)
        placed = events_pb2.OrderPlaced(
            customer_id=request.customer_id,
            lines=[
                events_pb2.OrderLine(
                    sku=line.sku,
                    name=line.name,
                    quantity=line.quantity,
                    unit_price=_money(line.unit_price_minor, line.currency),
                )
                for line in lines
            ],
            total=_money(total, currency),
            placed_at=timestamp(now),
        )
        events = [build_event(meta, ORDER, order_id, 1, order_placed=placed)]
        events += [
            build_event(
                meta,
                PRODUCT,
                sku,
                row[5],
                stock_reserved=events_pb2.StockReserved(order_id=order_id, quantity=quantities[sku], stock=row[4]),
            )
            for sku, row in sorted(reserved.items())
        ]
        versions = {(ORDER, order_id): 1} | {(PRODUCT, sku): row[5] for sku, row in reserved.items()}
        response = commands_pb2.PlaceOrderResponse(
            order_id=order_id, version=1, consistency_token=consistency.encode(versions), total=_money(total, currency)
        )
        order_row = (order_id, request.customer_id, domain.ORDER_PLACED, total, currency, now, now)
        items = (
            order_id,
            list(range(len(lines))),
            [line.sku for line in lines],
            [line.name for line in lines],
            [line.quantity for line in lines],
            [line.unit_price_minor for line in lines],
        )
        return response, order_row, items, events

    async def _stored(self, request: Message, command: str, digest: bytes, parse: Callable[[bytes], R]) -> R:
        """The response an earlier identical request stored (the claim conflicted with it)."""
        async with driver_transaction(self._engine) as conn:
            cur = await conn.execute(
                "SELECT command, request_hash, response FROM idempotency_keys WHERE request_id = %s",
                (request.request_id,),  # type: ignore[attr-defined]
            )
            row = await cur.fetchone()
        if row is None or row[0] != command or bytes(row[1]) != digest or row[2] is None:
            raise RequestIdReused(f"request_id {request.request_id!r} was already used for a different request")  # type: ignore[attr-defined]
        return parse(bytes(row[2]))

    async def cancel_order(
        self, request: commands_pb2.CancelOrderRequest, ctx: CommandContext
    ) -> commands_pb2.CancelOrderResponse:
        """Cancel a PLACED order and give its units back to stock."""
        domain.validate_cancel_order(request)
        order_id = request.order_id.lower()
        async with self._engine.begin() as conn:
            stored = await _claim(conn, "CancelOrder", request, commands_pb2.CancelOrderResponse.FromString)
            if stored is not None:
                return stored
            order = (
                await conn.execute(
                    sa.select(orders.c.status, orders.c.version).where(orders.c.id == order_id).with_for_update()
                )
            ).first()
            if order is None:
                raise NotFound(f"order {order_id} does not exist")
            if request.HasField("expected_version") and request.expected_version != order.version:
                raise VersionConflict(f"order {order_id}", request.expected_version, order.version)
            if order.status != domain.ORDER_PLACED:
                raise FailedPrecondition(
                    f"order {order_id} is {order.status}, only a PLACED order can be cancelled",
                    "ORDER_NOT_PLACED",
                    f"orders/{order_id}",
                )
            items = (
                await conn.execute(
                    sa.select(
                        order_items.c.sku, sa.cast(sa.func.sum(order_items.c.quantity), sa.BigInteger).label("quantity")
                    )
                    .where(order_items.c.order_id == order_id)
                    .group_by(order_items.c.sku)
                    .order_by(order_items.c.sku)
                )
            ).all()
            now = datetime.now(UTC)
            version = order.version + 1
            await conn.execute(
                orders.update()
                .where(orders.c.id == order_id)
                .values(status=domain.ORDER_CANCELLED, cancel_reason=request.reason, version=version, updated_at=now)
            )
            meta = ctx.events_at(now)
            events = [
                build_event(
                    meta,
                    ORDER,
                    order_id,
                    version,
                    order_cancelled=events_pb2.OrderCancelled(reason=request.reason, cancelled_at=timestamp(now)),
                )
            ]
            versions = {(ORDER, order_id): version}
            for item in items:  # ascending SKU order
                row = (
                    await conn.execute(
                        products.update()
                        .where(products.c.sku == item.sku)
                        .values(stock=products.c.stock + item.quantity, version=products.c.version + 1, updated_at=now)
                        .returning(products.c.stock, products.c.version)
                    )
                ).one()
                versions[(PRODUCT, item.sku)] = row.version
                events.append(
                    build_event(
                        meta,
                        PRODUCT,
                        item.sku,
                        row.version,
                        stock_released=events_pb2.StockReleased(
                            order_id=order_id, quantity=item.quantity, stock=row.stock
                        ),
                    )
                )
            response = commands_pb2.CancelOrderResponse(
                order_id=order_id, version=version, consistency_token=consistency.encode(versions)
            )
            await _finish(conn, request.request_id, events, response)
        self._on_commit()
        return response

    async def update_inventory(
        self, request: commands_pb2.UpdateInventoryRequest, ctx: CommandContext
    ) -> commands_pb2.UpdateInventoryResponse:
        """Change stock by a delta or to a level; stock never goes below zero."""
        domain.validate_update_inventory(request)
        async with self._engine.begin() as conn:
            stored = await _claim(conn, "UpdateInventory", request, commands_pb2.UpdateInventoryResponse.FromString)
            if stored is not None:
                return stored
            product = await self._lock_product(conn, request.sku)
            if product is None:
                raise NotFound(f"product {request.sku!r} is not in the catalog")
            if request.HasField("expected_version") and request.expected_version != product.version:
                raise VersionConflict(f"product {request.sku!r}", request.expected_version, product.version)
            new_stock = product.stock + request.delta if request.WhichOneof("change") == "delta" else request.set_level
            if new_stock < 0:
                raise FailedPrecondition(
                    f"stock of {request.sku!r} would become {new_stock}; it is {product.stock}",
                    "INSUFFICIENT_STOCK",
                    request.sku,
                )
            if new_stock > domain.MAX_STOCK:
                raise FailedPrecondition(
                    f"stock of {request.sku!r} would exceed {domain.MAX_STOCK}", "STOCK_LIMIT", request.sku
                )
            now = datetime.now(UTC)
            version = product.version + 1
            await conn.execute(
                products.update()
                .where(products.c.sku == request.sku)
                .values(stock=new_stock, version=version, updated_at=now)
            )
            event = build_event(
                ctx.events_at(now),
                PRODUCT,
                request.sku,
                version,
                inventory_adjusted=events_pb2.InventoryAdjusted(delta=new_stock - product.stock, stock=new_stock),
            )
            response = commands_pb2.UpdateInventoryResponse(
                sku=request.sku,
                version=version,
                stock=new_stock,
                consistency_token=consistency.encode({(PRODUCT, request.sku): version}),
            )
            await _finish(conn, request.request_id, [event], response)
        self._on_commit()
        return response

    async def upsert_product(
        self, request: commands_pb2.UpsertProductRequest, ctx: CommandContext
    ) -> commands_pb2.UpsertProductResponse:
        """Create a product (version 1, no stock) or change its name and price."""
        domain.validate_upsert_product(request)
        price = request.unit_price
        async with self._engine.begin() as conn:
            stored = await _claim(conn, "UpsertProduct", request, commands_pb2.UpsertProductResponse.FromString)
            if stored is not None:
                return stored
            now = datetime.now(UTC)
            product = await self._lock_product(conn, request.sku)
            if product is None:
                created = (
                    await conn.execute(
                        pg_insert(products)
                        .values(
                            sku=request.sku,
                            name=request.name,
                            unit_price_minor=price.minor_units,
                            currency=price.currency_code,
                            stock=0,
                            version=1,
                            created_at=now,
                            updated_at=now,
                        )
                        .on_conflict_do_nothing()
                        .returning(products.c.version)
                    )
                ).first()
                if created is None:  # a concurrent request created it first: update that row instead
                    product = await self._lock_product(conn, request.sku)
            current = 0 if product is None else product.version
            if request.HasField("expected_version") and request.expected_version != current:
                raise VersionConflict(f"product {request.sku!r}", request.expected_version, current)
            if product is None:
                version, stock = 1, 0
            else:
                version, stock = current + 1, product.stock
                await conn.execute(
                    products.update()
                    .where(products.c.sku == request.sku)
                    .values(
                        name=request.name,
                        unit_price_minor=price.minor_units,
                        currency=price.currency_code,
                        version=version,
                        updated_at=now,
                    )
                )
            event = build_event(
                ctx.events_at(now),
                PRODUCT,
                request.sku,
                version,
                product_upserted=events_pb2.ProductUpserted(
                    name=request.name, unit_price=_money(price.minor_units, price.currency_code), stock=stock
                ),
            )
            response = commands_pb2.UpsertProductResponse(
                sku=request.sku,
                version=version,
                consistency_token=consistency.encode({(PRODUCT, request.sku): version}),
            )
            await _finish(conn, request.request_id, [event], response)
        self._on_commit()
        return response

    @staticmethod
    async def _lock_product(conn: AsyncConnection, sku: str) -> sa.Row | None:
        return (
            await conn.execute(
                sa.select(products.c.stock, products.c.version).where(products.c.sku == sku).with_for_update()
            )
        ).first()
