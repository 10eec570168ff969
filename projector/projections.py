"""Applying one event to the read model, exactly once and in version order.

The invariant: a read row at version v accepts only the event of version v + 1 of its aggregate.
- version 1 inserts the row (INSERT … ON CONFLICT DO NOTHING: a second copy changes nothing);
- version n > 1 updates `WHERE version = n - 1`, so it applies once and only on top of n - 1;
- when nothing matched, the stored version tells why: >= n is a DUPLICATE (skip and ack), anything
  else (no row, or a row behind n - 1) is a GAP: the predecessor has not been applied yet, so the
  event must wait (nak with a delay) instead of skipping a version.
Every statement runs in the caller's transaction, so the outcome commits with the batch or not at all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from orders.read_model import order_summaries, product_views
from orders.v1 import events_pb2


class Outcome(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    GAP = "gap"


@dataclass(frozen=True)
class Change:
    """A read row that a committed batch changed (for the query side's wake-up signal)."""

    kind: str  # "order" | "product"
    key: str
    version: int
    stream_seq: int
    customer_id: str = ""


def _when(ts: Any) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


_FIRST_ONLY = {"order_placed"}
_NEVER_FIRST = {"order_cancelled", "inventory_adjusted", "stock_reserved", "stock_released"}
_AGGREGATE_OF = {
    "order_placed": "order",
    "order_cancelled": "order",
    "product_upserted": "product",
    "inventory_adjusted": "product",
    "stock_reserved": "product",
    "stock_released": "product",
}


class NeverApplicable(ValueError):
    """The event can never be applied, whatever arrives later (a permanent error)."""


def check_applicable(event: events_pb2.EventEnvelope) -> None:
    """Reject, before any I/O, an event whose payload contradicts its envelope."""
    kind = event.WhichOneof("payload")
    if kind not in _AGGREGATE_OF:
        raise NeverApplicable(f"unknown payload {kind!r}")
    if _AGGREGATE_OF[kind] != event.aggregate_type:
        raise NeverApplicable(f"{kind} does not belong to a {event.aggregate_type} aggregate")
    if kind in _FIRST_ONLY and event.aggregate_version != 1:
        raise NeverApplicable(f"{kind} must be version 1, got {event.aggregate_version}")
    if kind in _NEVER_FIRST and event.aggregate_version == 1:
        raise NeverApplicable(f"{kind} cannot be the first event of its aggregate")


async def _apply_versioned(
    conn: AsyncConnection,
    table: sa.Table,
    key_column: sa.Column,
    key: str,
    version: int,
    insert_values: dict[str, Any] | None,
    update_values: dict[str, Any] | None,
) -> Outcome:
    """Insert (version 1) or update on top of version - 1; classify a no-op as duplicate or gap."""
    if version == 1:
        assert insert_values is not None, "check_applicable lets only creating events be version 1"
        stmt: Any = pg_insert(table).values(**insert_values).on_conflict_do_nothing()
    else:
        assert update_values is not None, "check_applicable lets creating events be version 1 only"
        stmt = table.update().where(key_column == key, table.c.version == version - 1).values(**update_values)
    if (await conn.execute(stmt.returning(key_column))).first() is not None:
        return Outcome.APPLIED
    stored = (await conn.execute(sa.select(table.c.version).where(key_column == key))).scalar()
    return Outcome.DUPLICATE if stored is not None and stored >= version else Outcome.GAP


def _search_document(customer_id: str, lines: list[events_pb2.OrderLine]) -> Any:
    words = " ".join([customer_id, *(f"{line.sku} {line.name}" for line in lines)])
    return sa.func.to_tsvector("simple", words)


async def apply_event(
    conn: AsyncConnection, event: events_pb2.EventEnvelope, stream_seq: int
) -> tuple[Outcome, Change]:
    """Apply one decoded event (that passed check_applicable) in the caller's transaction."""
    kind = event.WhichOneof("payload")
    version = event.aggregate_version
    key = event.aggregate_id
    occurred = _when(event.occurred_at)
    if kind == "order_placed":
        placed = event.order_placed
        lines = [
            {
                "sku": line.sku,
                "name": line.name,
                "quantity": line.quantity,
                "unit_price_minor": line.unit_price.minor_units,
            }
            for line in placed.lines
        ]
        outcome = await _apply_versioned(
            conn,
            order_summaries,
            order_summaries.c.order_id,
            key,
            version,
            insert_values=dict(
                order_id=key,
                customer_id=placed.customer_id,
                status="PLACED",
                lines=lines,
                item_count=sum(line.quantity for line in placed.lines),
                total_minor=placed.total.minor_units,
                currency=placed.total.currency_code,
                placed_at=_when(placed.placed_at),
                updated_at=occurred,
                version=version,
                stream_seq=stream_seq,
                search=_search_document(placed.customer_id, list(placed.lines)),
            ),
            update_values=None,
        )
        return outcome, Change("order", key, version, stream_seq, placed.customer_id)
    if kind == "order_cancelled":
        outcome = await _apply_versioned(
            conn,
            order_summaries,
            order_summaries.c.order_id,
            key,
            version,
            insert_values=None,
            update_values=dict(
                status="CANCELLED",
                cancel_reason=event.order_cancelled.reason,
                updated_at=occurred,
                version=version,
                stream_seq=stream_seq,
            ),
        )
        customer = ""
        if outcome is Outcome.APPLIED:
            customer = (
                await conn.execute(sa.select(order_summaries.c.customer_id).where(order_summaries.c.order_id == key))
            ).scalar_one()
        return outcome, Change("order", key, version, stream_seq, customer)
    if kind == "product_upserted":
        up = event.product_upserted
        values = dict(
            name=up.name,
            unit_price_minor=up.unit_price.minor_units,
            currency=up.unit_price.currency_code,
            stock=up.stock,
            version=version,
            stream_seq=stream_seq,
            updated_at=occurred,
        )
        outcome = await _apply_versioned(
            conn,
            product_views,
            product_views.c.sku,
            key,
            version,
            insert_values=dict(sku=key, **values),
            update_values=values,
        )
        return outcome, Change("product", key, version, stream_seq)
    if kind in ("inventory_adjusted", "stock_reserved", "stock_released"):
        stock = getattr(event, kind).stock
        outcome = await _apply_versioned(
            conn,
            product_views,
            product_views.c.sku,
            key,
            version,
            insert_values=None,
            update_values=dict(stock=stock, version=version, stream_seq=stream_seq, updated_at=occurred),
        )
        return outcome, Change("product", key, version, stream_seq)
    raise NeverApplicable(f"unknown event payload {kind!r}")
