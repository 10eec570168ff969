"""Applying a batch of events to the read model: exactly once, and in version order per aggregate.

The invariant: a read row at version v accepts only its aggregate's event of version v + 1.
For one batch, in the caller's transaction, in two round trips:
  1. the current rows of every aggregate in the batch are read and locked (SELECT … ORDER BY key
     FOR UPDATE: a second projector instance waits, then sees the new versions);
  2. each aggregate's events are taken in version order and folded in memory: version <= current is a
     DUPLICATE (no effect), version == current + 1 is APPLIED, anything higher is a GAP (its
     predecessor has not been applied yet; it must wait, never skip a version);
  3. the folded rows are written with one statement per table: a multi-row INSERT for new aggregates
     (ON CONFLICT DO NOTHING), a multi-row UPDATE guarded by `version = <version read in step 1>`, and
     the order change log. A row that another instance created after step 1 (a missing row cannot be
     locked) is not written; the statement then fails on purpose and the whole batch rolls back, to
     be applied again, so no batch is ever committed in part.
A handful of statements per batch, whatever its size.
"""

from __future__ import annotations

import enum
import functools
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql

from orders.v1 import events_pb2

Row = dict[str, Any]


class Outcome(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    GAP = "gap"


class NeverApplicable(ValueError):
    """The event can never be applied, whatever arrives later (a permanent error)."""


@dataclass
class Item:
    """One event of a batch, with its stream sequence and, after apply_events, its outcome."""

    seq: int
    event: events_pb2.EventEnvelope
    outcome: Outcome | None = None
    # For a GAP: the aggregate's latest applied version and the stream sequence of its event (0: none yet).
    applied_version: int = 0
    applied_seq: int = 0

    @property
    def aggregate(self) -> tuple[str, str]:
        return self.event.aggregate_type, self.event.aggregate_id


@dataclass(frozen=True)
class Change:
    """A read row that a committed batch changed (for the query side's wake-up signal)."""

    kind: str  # "order" | "product"
    key: str
    version: int
    stream_seq: int
    customer_id: str = ""


@dataclass(frozen=True)
class Tables:
    """Where the projection writes: the live tables, or fresh ones during a rebuild (no change log)."""

    orders: str = "order_summaries"
    products: str = "product_views"
    changes: str | None = "order_changes"


LIVE = Tables()

_AGGREGATE_OF = {
    "order_placed": "order",
    "order_cancelled": "order",
    "product_upserted": "product",
    "inventory_adjusted": "product",
    "stock_reserved": "product",
    "stock_released": "product",
}
_FIRST_ONLY = {"order_placed"}
_NEVER_FIRST = {"order_cancelled", "inventory_adjusted", "stock_reserved", "stock_released"}


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


def _when(ts: Any) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]


def _fold_order(row: Row | None, seq: int, event: events_pb2.EventEnvelope) -> Row:
    kind = event.WhichOneof("payload")
    common = {"version": event.aggregate_version, "stream_seq": seq, "updated_at": _when(event.occurred_at)}
    if kind == "order_placed":
        placed = event.order_placed
        lines = [
            {"sku": x.sku, "name": x.name, "quantity": x.quantity, "unit_price_minor": x.unit_price.minor_units}
            for x in placed.lines
        ]
        return {
            "order_id": event.aggregate_id,
            "customer_id": placed.customer_id,
            "status": "PLACED",
            "lines": lines,
            "item_count": sum(x.quantity for x in placed.lines),
            "total_minor": placed.total.minor_units,
            "currency": placed.total.currency_code,
            "placed_at": _when(placed.placed_at),
            "cancel_reason": "",
            "search_text": " ".join([placed.customer_id, *(f"{x.sku} {x.name}" for x in placed.lines)]),
            **common,
        }
    assert row is not None and kind == "order_cancelled"
    return {**row, "status": "CANCELLED", "cancel_reason": event.order_cancelled.reason, **common}


def _fold_product(row: Row | None, seq: int, event: events_pb2.EventEnvelope) -> Row:
    kind = event.WhichOneof("payload")
    common = {"version": event.aggregate_version, "stream_seq": seq, "updated_at": _when(event.occurred_at)}
    if kind == "product_upserted":
        up = event.product_upserted
        return {
            "sku": event.aggregate_id,
            "name": up.name,
            "unit_price_minor": up.unit_price.minor_units,
            "currency": up.unit_price.currency_code,
            "stock": up.stock,
            **common,
        }
    assert row is not None
    return {**row, "stock": getattr(event, kind).stock, **common}


@dataclass(frozen=True)
class _Projection:
    """How one aggregate type maps onto its table."""

    kind: str
    key: str
    columns: dict[str, str]  # stored column → SQL type
    mutable: tuple[str, ...]  # columns a later version may change
    fold: Callable[[Row | None, int, events_pb2.EventEnvelope], Row]
    insert_extra: dict[str, tuple[str, str]]  # column → (SQL expression over r.*, input field type)

    def table(self, tables: Tables) -> str:
        return tables.orders if self.kind == "order" else tables.products


_ORDERS = _Projection(
    kind="order",
    key="order_id",
    columns={
        "order_id": "text",
        "customer_id": "text",
        "status": "text",
        "lines": "jsonb",
        "item_count": "bigint",
        "total_minor": "bigint",
        "currency": "text",
        "placed_at": "timestamptz",
        "updated_at": "timestamptz",
        "cancel_reason": "text",
        "version": "bigint",
        "stream_seq": "bigint",
    },
    mutable=("status", "cancel_reason", "updated_at", "version", "stream_seq"),
    fold=_fold_order,
    insert_extra={"search": ("to_tsvector('simple', r.search_text)", "search_text text")},
)
_PRODUCTS = _Projection(
    kind="product",
    key="sku",
    columns={
        "sku": "text",
        "name": "text",
        "unit_price_minor": "bigint",
        "currency": "text",
        "stock": "bigint",
        "version": "bigint",
        "stream_seq": "bigint",
        "updated_at": "timestamptz",
    },
    mutable=("name", "unit_price_minor", "currency", "stock", "version", "stream_seq", "updated_at"),
    fold=_fold_product,
    insert_extra={},
)
PROJECTIONS = {p.kind: p for p in (_ORDERS, _PRODUCTS)}


def fold_aggregate(proj: _Projection, current: Row | None, items: list[Item], trail: list[Row]) -> Row | None:
    """Fold items (one aggregate's events, in any order) onto its current row (None: none yet) in version
    order, and set each item's outcome: a version at or below the row's is a DUPLICATE, the next one is
    APPLIED, anything beyond it is a GAP (with the version it waits after). Pure: no I/O.

    Returns the row after the last applied event; every state the row passes through is appended to
    trail (the change log's rows).
    """
    row = current
    version = 0 if current is None else current["version"]
    for item in sorted(items, key=lambda i: (i.event.aggregate_version, i.seq)):
        if item.event.aggregate_version <= version:
            item.outcome = Outcome.DUPLICATE
        elif item.event.aggregate_version == version + 1:
            row = proj.fold(row, item.seq, item.event)
            trail.append(row)
            version = item.event.aggregate_version
            item.outcome = Outcome.APPLIED
        else:
            item.outcome = Outcome.GAP
            item.applied_version, item.applied_seq = version, 0 if row is None else row["stream_seq"]
    return row


def _json(rows: list[Row]) -> str:
    return json.dumps(rows, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v))


def _recordset(names: list[str], types: dict[str, str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("{} " + types[name]).format(sql.Identifier(name)) for name in names)  # type: ignore[arg-type]


@functools.cache
def _load_query(kind: str, table: str) -> sql.Composed:
    proj = PROJECTIONS[kind]
    return sql.SQL("SELECT {cols} FROM {table} WHERE {key} = ANY(%s) ORDER BY {key} FOR UPDATE").format(
        cols=sql.SQL(", ").join(map(sql.Identifier, proj.columns)),
        table=sql.Identifier(table),
        key=sql.Identifier(proj.key),
    )


@functools.cache  # composed once per table: psycopg then finds the statement it prepared by its text
def _write_query(kind: str, table: str, changes_table: str | None) -> sql.Composed:
    """One statement writing a batch's rows of one table: the new ones (INSERT … ON CONFLICT DO NOTHING),
    the changed ones (UPDATE guarded by the version read under lock) and, for orders, every state the
    rows passed through into the change log. It fails, so that the transaction rolls back, when fewer
    rows were written than planned: another projector instance created one of them meanwhile (a row
    that did not exist could not be locked); `concurrent_write` recognises that failure."""
    proj = PROJECTIONS[kind]
    key = sql.Identifier(proj.key)
    insert_types = {**proj.columns, **dict(t.split(" ", 1) for _, t in proj.insert_extra.values())}
    insert_fields = [*proj.columns, *(t.split(" ", 1)[0] for _, t in proj.insert_extra.values())]
    update_fields = [proj.key, *proj.mutable]
    parts: list[sql.Composable] = [
        sql.SQL(
            "WITH ins AS (INSERT INTO {table} ({cols}) SELECT {values} FROM jsonb_to_recordset(%(inserts)s::jsonb)"
            " AS r({record}) ON CONFLICT ({key}) DO NOTHING RETURNING 1), "
        ).format(
            table=sql.Identifier(table),
            cols=sql.SQL(", ").join(map(sql.Identifier, [*proj.columns, *proj.insert_extra])),
            values=sql.SQL(", ").join(
                [sql.SQL("r.") + sql.Identifier(c) for c in proj.columns]
                + [sql.SQL(expr) for expr, _ in proj.insert_extra.values()]  # type: ignore[arg-type]
            ),
            record=_recordset(insert_fields, insert_types),
            key=key,
        ),
        sql.SQL(
            "upd AS (UPDATE {table} AS t SET {assignments} FROM jsonb_to_recordset(%(updates)s::jsonb)"
            " AS r({record}) WHERE t.{key} = r.{key} AND t.version = r.base_version RETURNING 1)"
        ).format(
            table=sql.Identifier(table),
            assignments=sql.SQL(", ").join(sql.SQL("{c} = r.{c}").format(c=sql.Identifier(c)) for c in proj.mutable),
            record=_recordset([*update_fields, "base_version"], {**proj.columns, "base_version": "bigint"}),
            key=key,
        ),
    ]
    if changes_table is not None:  # orders only: the change log that watches resume from
        parts.append(
            sql.SQL(
                ", log AS (INSERT INTO {table} ({cols}) SELECT {values} FROM jsonb_to_recordset(%(trail)s::jsonb)"
                " AS r({record}) ON CONFLICT (stream_seq) DO NOTHING)"
            ).format(
                table=sql.Identifier(changes_table),
                cols=sql.SQL(", ").join(map(sql.Identifier, proj.columns)),
                values=sql.SQL(", ").join(sql.SQL("r.") + sql.Identifier(c) for c in proj.columns),
                record=_recordset(list(proj.columns), proj.columns),
            )
        )
    # The written count comes from the CTEs, so the failing branch cannot be folded at planning time.
    parts.append(
        sql.SQL(
            " SELECT CASE WHEN (SELECT count(*) FROM ins) + (SELECT count(*) FROM upd) = %(planned)s THEN 0"
            " ELSE CAST(%(conflict)s || ((SELECT count(*) FROM ins) + (SELECT count(*) FROM upd))::text AS int) END"
        )
    )
    return sql.Composed(parts)


CONCURRENT_WRITE = "ConcurrentWrite: another projector instance created a row first; rows written here: "


def concurrent_write(exc: BaseException) -> bool:
    """Whether exc is a write statement's planned failure: another projector instance created one of
    the batch's rows first. The transaction rolled back; the batch can be applied again at once (it
    then reads, and locks, the row the other instance wrote)."""
    return isinstance(exc, psycopg.errors.InvalidTextRepresentation) and CONCURRENT_WRITE in str(exc)


@dataclass
class Plan:
    """A batch folded onto the rows it read: the statements that write it, and the changes they make."""

    writes: list[tuple[sql.Composed, dict[str, Any]]]
    changes: list[Change]


async def queue_reads(conn: AsyncConnection[Any], items: list[Item], tables: Tables = LIVE) -> list[Any]:
    """Send the reads that lock the batch's rows (in pipeline mode they go out together); pass what this
    returns to `plan`. Always orders before products: the same lock order everywhere."""
    cursors = []
    for proj in (_ORDERS, _PRODUCTS):
        keys = sorted({item.event.aggregate_id for item in items if item.event.aggregate_type == proj.kind})
        cursors.append(await conn.execute(_load_query(proj.kind, proj.table(tables)), (keys,)) if keys else None)
    return cursors


async def _rows(proj: _Projection, cursor: Any) -> dict[str, Row]:
    if cursor is None:
        return {}
    names = list(proj.columns)
    return {row[0]: dict(zip(names, row, strict=True)) for row in await cursor.fetchall()}


async def plan(items: list[Item], reads: list[Any], tables: Tables = LIVE) -> Plan:
    """Fold items (each passed check_applicable) onto the rows `queue_reads` read; see the module doc.

    Sets every item's outcome. The changes: one per order event applied (watchers want each one) and
    one per product whose row is written (waiters only need the last).
    """
    grouped: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for item in items:
        grouped[item.aggregate].append(item)
    result = Plan([], [])
    for proj, cursor in zip((_ORDERS, _PRODUCTS), reads, strict=True):
        current = await _rows(proj, cursor)
        inserts: list[Row] = []
        updates: list[Row] = []
        trail: list[Row] = []
        for kind, key in sorted(grouped):
            if kind != proj.kind:
                continue
            before = current.get(key)
            states: list[Row] = []
            after = fold_aggregate(proj, before, grouped[(kind, key)], states)
            if after is None or (before is not None and after["version"] == before["version"]):
                continue
            if before is None:
                inserts.append(after)
            else:
                updates.append({f: after[f] for f in (proj.key, *proj.mutable)} | {"base_version": before["version"]})
            trail += states if proj is _ORDERS else [after]
        if not inserts and not updates:
            continue
        changes_table = tables.changes if proj is _ORDERS else None
        params = {
            "inserts": _json(inserts),
            "updates": _json(updates),
            "planned": len(inserts) + len(updates),
            "conflict": CONCURRENT_WRITE,
        }
        if changes_table is not None:
            params["trail"] = _json([{c: row[c] for c in proj.columns} for row in trail])
        result.writes.append((_write_query(proj.kind, proj.table(tables), changes_table), params))
        result.changes += [
            Change(proj.kind, s[proj.key], s["version"], s["stream_seq"], s.get("customer_id", "")) for s in trail
        ]
    return result


async def apply_events(conn: AsyncConnection[Any], items: list[Item], tables: Tables = LIVE) -> list[Change]:
    """Apply items (each passed check_applicable) in the caller's transaction, in two round trips: the
    locking reads, then the writes. When another instance created one of the rows first, the writes
    fail (see concurrent_write) and the transaction with them."""
    async with conn.pipeline():
        reads = await queue_reads(conn, items, tables)
    folded = await plan(items, reads, tables)
    await execute_writes(conn, folded)
    return folded.changes


async def execute_writes(conn: AsyncConnection[Any], folded: Plan) -> None:
    """Send the plan's writes (in pipeline mode they go out together with what follows)."""
    for query, params in folded.writes:
        await conn.execute(query, params)
