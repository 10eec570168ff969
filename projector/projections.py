"""Applying a batch of events to the read model: exactly once, and in version order per aggregate.

The invariant: a read row at version v accepts only its aggregate's event of version v + 1.
For one batch, in the caller's transaction:
  1. the current rows of every aggregate in the batch are read and locked (SELECT … ORDER BY key
     FOR UPDATE: a second projector instance waits, then sees the new versions);
  2. each aggregate's events are taken in version order and folded in memory: version <= current is a
     DUPLICATE (no effect), version == current + 1 is APPLIED, anything higher is a GAP (its
     predecessor has not been applied yet; it must wait, never skip a version);
  3. the folded rows are written with one multi-row INSERT (new aggregates, ON CONFLICT DO NOTHING)
     and one multi-row UPDATE guarded by `version = <version read in step 1>`, per table. A row that
     another instance created in the meantime is not written; its events become CONFLICT (retry soon).
A handful of statements per batch, whatever its size.
"""

from __future__ import annotations

import enum
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import AsyncConnection, sql

from orders.v1 import events_pb2

Row = dict[str, Any]


class Outcome(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    GAP = "gap"
    CONFLICT = "conflict"


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


def _json(rows: list[Row]) -> str:
    return json.dumps(rows, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v))


async def _load(conn: AsyncConnection[Any], proj: _Projection, table: str, keys: list[str]) -> dict[str, Row]:
    query = sql.SQL("SELECT {cols} FROM {table} WHERE {key} = ANY(%s) ORDER BY {key} FOR UPDATE").format(
        cols=sql.SQL(", ").join(map(sql.Identifier, proj.columns)),
        table=sql.Identifier(table),
        key=sql.Identifier(proj.key),
    )
    cur = await conn.execute(query, (keys,))
    names = list(proj.columns)
    return {row[0]: dict(zip(names, row, strict=True)) for row in await cur.fetchall()}


async def _insert(conn: AsyncConnection[Any], proj: _Projection, table: str, rows: list[Row]) -> set[str]:
    if not rows:
        return set()
    record = [f"{name} {kind}" for name, kind in proj.columns.items()] + [t for _, t in proj.insert_extra.values()]
    query = sql.SQL(
        "INSERT INTO {table} ({cols}) SELECT {values} FROM jsonb_to_recordset(%s::jsonb) AS r({record}) "
        "ON CONFLICT ({key}) DO NOTHING RETURNING {key}"
    ).format(
        table=sql.Identifier(table),
        cols=sql.SQL(", ").join(map(sql.Identifier, [*proj.columns, *proj.insert_extra])),
        values=sql.SQL(", ").join(
            [sql.SQL("r.") + sql.Identifier(c) for c in proj.columns]
            + [sql.SQL(expr) for expr, _ in proj.insert_extra.values()]  # type: ignore[arg-type]
        ),
        record=sql.SQL(", ".join(record)),  # type: ignore[arg-type]
        key=sql.Identifier(proj.key),
    )
    cur = await conn.execute(query, (_json(rows),))
    return {row[0] for row in await cur.fetchall()}


async def _update(conn: AsyncConnection[Any], proj: _Projection, table: str, rows: list[Row]) -> set[str]:
    if not rows:
        return set()
    fields = [proj.key, *proj.mutable]
    record = [f"{name} {proj.columns[name]}" for name in fields] + ["base_version bigint"]
    query = sql.SQL(
        "UPDATE {table} AS t SET {assignments} FROM jsonb_to_recordset(%s::jsonb) AS r({record}) "
        "WHERE t.{key} = r.{key} AND t.version = r.base_version RETURNING t.{key}"
    ).format(
        table=sql.Identifier(table),
        assignments=sql.SQL(", ").join(sql.SQL("{c} = r.{c}").format(c=sql.Identifier(c)) for c in proj.mutable),
        record=sql.SQL(", ".join(record)),  # type: ignore[arg-type]
        key=sql.Identifier(proj.key),
    )
    cur = await conn.execute(
        query, (_json([{f: row[f] for f in fields} | {"base_version": row["base_version"]} for row in rows]),)
    )
    return {row[0] for row in await cur.fetchall()}


def _fold_aggregate(proj: _Projection, current: Row | None, items: list[Item], trail: list[Row]) -> Row | None:
    """Fold items (one aggregate) onto current in version order; set each item's outcome.

    Every state the row passes through is appended to trail (the change log's rows).
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


async def _log_changes(conn: AsyncConnection[Any], table: str, rows: list[Row]) -> None:
    """Append order states to the change log (a redelivered batch finds them there already)."""
    if not rows:
        return
    columns = dict(_ORDERS.columns)
    record = ", ".join(f"{name} {kind}" for name, kind in columns.items())
    query = sql.SQL(
        "INSERT INTO {table} ({cols}) SELECT {values} FROM jsonb_to_recordset(%s::jsonb) AS r({record}) "
        "ON CONFLICT (stream_seq) DO NOTHING"
    ).format(
        table=sql.Identifier(table),
        cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
        values=sql.SQL(", ").join(sql.SQL("r.") + sql.Identifier(c) for c in columns),
        record=sql.SQL(record),  # type: ignore[arg-type]
    )
    await conn.execute(query, (_json([{c: row[c] for c in columns} for row in rows]),))


async def apply_events(conn: AsyncConnection[Any], items: list[Item], tables: Tables = LIVE) -> list[Change]:
    """Apply items (each passed check_applicable) in the caller's transaction; see the module doc.

    Sets every item's outcome. Returns one Change per order event applied (watchers want each one)
    and one per product whose row was written (waiters only need the last).
    """
    grouped: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for item in items:
        grouped[item.aggregate].append(item)
    changes: list[Change] = []
    for proj in (_ORDERS, _PRODUCTS):  # always orders before products: the same lock order everywhere
        keys = sorted(key for kind, key in grouped if kind == proj.kind)
        if not keys:
            continue
        table = proj.table(tables)
        current = await _load(conn, proj, table, keys)
        inserts: list[Row] = []
        updates: list[Row] = []
        trails: dict[str, list[Row]] = {}
        for key in keys:
            before = current.get(key)
            after = _fold_aggregate(proj, before, grouped[(proj.kind, key)], trails.setdefault(key, []))
            if after is None or (before is not None and after["version"] == before["version"]):
                continue
            if before is None:
                inserts.append(after)
            else:
                updates.append(after | {"base_version": before["version"]})
        written = await _insert(conn, proj, table, inserts) | await _update(conn, proj, table, updates)
        logged: list[Row] = []
        for row in inserts + updates:
            key = row[proj.key]
            if key not in written:  # another projector instance created it first: retry these events
                for item in grouped[(proj.kind, key)]:
                    if item.outcome is Outcome.APPLIED:
                        item.outcome = Outcome.CONFLICT
                continue
            states = trails[key] if proj is _ORDERS else [row]
            logged += states
            changes += [Change(proj.kind, key, s["version"], s["stream_seq"], s.get("customer_id", "")) for s in states]
        if proj is _ORDERS and tables.changes:
            await _log_changes(conn, tables.changes, logged)
    return changes
