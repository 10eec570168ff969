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
from typing import TypeVar

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from command_service import domain
from command_service.schema import idempotency_keys, order_items, orders, outbox, products
from orders import consistency
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
        """Reserve stock for every line (all or none), then record the order and its events."""
        domain.validate_place_order(request)
        async with self._engine.begin() as conn:
            stored = await _claim(conn, "PlaceOrder", request, commands_pb2.PlaceOrderResponse.FromString)
            if stored is not None:
                return stored
            now = datetime.now(UTC)
            order_id = str(uuid.uuid4())
            quantities = {line.sku: line.quantity for line in request.lines}
            reserved: dict[str, sa.Row] = {}
            for sku in sorted(quantities):  # ascending SKU order: no deadlock between orders
                reserved[sku] = await self._reserve(conn, sku, quantities[sku], now)
            lines = [
                domain.PricedLine(
                    sku=line.sku,
                    name=reserved[line.sku].name,
                    quantity=line.quantity,
                    unit_price_minor=reserved[line.sku].unit_price_minor,
                    currency=reserved[line.sku].currency,
                )
                for line in request.lines
            ]
            total, currency = domain.order_total(lines)
            if currency is None:
                raise FailedPrecondition(
                    "all products of one order must be priced in the same currency", "CURRENCY_MISMATCH", "lines"
                )
            await conn.execute(
                orders.insert().values(
                    id=order_id,
                    customer_id=request.customer_id,
                    status=domain.ORDER_PLACED,
                    total_minor=total,
                    currency=currency,
                    version=1,
                    created_at=now,
                    updated_at=now,
                )
            )
            await conn.execute(
                order_items.insert(),
                [
                    dict(
                        order_id=order_id,
                        line_no=i,
                        sku=line.sku,
                        name=line.name,
                        quantity=line.quantity,
                        unit_price_minor=line.unit_price_minor,
                    )
                    for i, line in enumerate(lines)
                ],
            )
            meta = ctx.events_at(now)
            events = [
                build_event(
                    meta,
                    ORDER,
                    order_id,
                    1,
                    order_placed=events_pb2.OrderPlaced(
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
                    ),
                )
            ]
            events += [
                build_event(
                    meta,
                    PRODUCT,
                    sku,
                    row.version,
                    stock_reserved=events_pb2.StockReserved(
                        order_id=order_id, quantity=quantities[sku], stock=row.stock
                    ),
                )
                for sku, row in reserved.items()
            ]
            versions = {(ORDER, order_id): 1} | {(PRODUCT, sku): row.version for sku, row in reserved.items()}
            response = commands_pb2.PlaceOrderResponse(
                order_id=order_id,
                version=1,
                consistency_token=consistency.encode(versions),
                total=_money(total, currency),
            )
            await _finish(conn, request.request_id, events, response)
        self._on_commit()
        return response

    async def _reserve(self, conn: AsyncConnection, sku: str, quantity: int, now: datetime) -> sa.Row:
        """Take quantity units of sku or fail; the conditional update makes overselling impossible.

        Under READ COMMITTED a blocked UPDATE re-checks `stock >= quantity` on the committed row, so
        concurrent orders can never take more than there is.
        """
        row = (
            await conn.execute(
                products.update()
                .where(products.c.sku == sku, products.c.stock >= quantity)
                .values(stock=products.c.stock - quantity, version=products.c.version + 1, updated_at=now)
                .returning(
                    products.c.name,
                    products.c.unit_price_minor,
                    products.c.currency,
                    products.c.stock,
                    products.c.version,
                )
            )
        ).first()
        if row is not None:
            return row
        stock = (await conn.execute(sa.select(products.c.stock).where(products.c.sku == sku))).scalar()
        if stock is None:
            raise NotFound(f"product {sku!r} is not in the catalog")
        raise FailedPrecondition(
            f"not enough stock for {sku!r}: {quantity} requested, {stock} available", "INSUFFICIENT_STOCK", sku
        )

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
