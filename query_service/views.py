"""SQL reads of the read model and their conversion to the query contract's messages."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.dialects.postgresql import psycopg as postgresql_psycopg

from orders.conversions import money, timestamp
from orders.db import libpq_url
from orders.errors import FieldViolation, InvalidArgument
from orders.inputs import MAX_ID_LENGTH, MAX_NAME_LENGTH, MAX_SKU_LENGTH, text_problem
from orders.read_model import order_changes, order_summaries, product_views
from orders.v1 import common_pb2, queries_pb2

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_QUERY_LENGTH = 200
STREAM_CHUNK = 500
_STATUS_NAMES = {common_pb2.ORDER_STATUS_PLACED: "PLACED", common_pb2.ORDER_STATUS_CANCELLED: "CANCELLED"}
_STATUS_ENUMS = {v: k for k, v in _STATUS_NAMES.items()}
SUMMARY_COLUMNS = [c for c in order_summaries.c if c.name != "search"]


def summary_message(row: Any) -> queries_pb2.OrderSummary:
    return queries_pb2.OrderSummary(
        order_id=row.order_id,
        customer_id=row.customer_id,
        status=_STATUS_ENUMS.get(row.status, common_pb2.ORDER_STATUS_UNSPECIFIED),
        lines=[
            queries_pb2.OrderSummaryLine(
                sku=line["sku"],
                name=line["name"],
                quantity=line["quantity"],
                unit_price=money(line["unit_price_minor"], row.currency),
                line_total=money(line["unit_price_minor"] * line["quantity"], row.currency),
            )
            for line in row.lines
        ],
        item_count=row.item_count,
        total=money(row.total_minor, row.currency),
        placed_at=timestamp(row.placed_at),
        updated_at=timestamp(row.updated_at),
        cancel_reason=row.cancel_reason,
        version=row.version,
        stream_sequence=row.stream_seq,
    )


def product_message(row: Any) -> queries_pb2.ProductView:
    return queries_pb2.ProductView(
        sku=row.sku,
        name=row.name,
        unit_price=money(row.unit_price_minor, row.currency),
        stock=row.stock,
        version=row.version,
        updated_at=timestamp(row.updated_at),
    )


def page_size(value: int, field: str = "page_size") -> int:
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise InvalidArgument([FieldViolation(field, f"must be 1 to {MAX_PAGE_SIZE}")])
    return value


def encode_page_token(state: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(state, separators=(",", ":")).encode()).decode().rstrip("=")


def check_text(value: str, field: str, max_length: int) -> None:
    problem = text_problem(value, max_length)
    if problem:
        raise InvalidArgument([FieldViolation(field, problem)])


def decode_page_token(token: str, expected_keys: set[str]) -> dict[str, Any]:
    bad = InvalidArgument([FieldViolation("page_token", "is not a page token returned by this call")])
    if len(token) > 1024:
        raise bad
    try:
        state = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise bad from None
    if not isinstance(state, dict) or set(state) != expected_keys:
        raise bad
    return state


def _filter_conditions(filt: queries_pb2.OrderFilter) -> list[Any]:
    violations: list[FieldViolation] = []
    conditions: list[Any] = []
    if filt.customer_id:
        problem = text_problem(filt.customer_id, MAX_ID_LENGTH)
        if problem:
            violations.append(FieldViolation("filter.customer_id", problem))
        conditions.append(order_summaries.c.customer_id == filt.customer_id)
    if filt.status:
        if filt.status not in _STATUS_NAMES:
            violations.append(FieldViolation("filter.status", "unknown status"))
        else:
            conditions.append(order_summaries.c.status == _STATUS_NAMES[filt.status])
    for name in ("placed_after", "placed_before"):
        if not filt.HasField(name):
            continue
        try:
            moment = getattr(filt, name).ToDatetime(tzinfo=UTC)
        except (ValueError, OverflowError):
            violations.append(FieldViolation(f"filter.{name}", "must be a timestamp between years 1 and 9999"))
            continue
        column = order_summaries.c.placed_at
        conditions.append(column >= moment if name == "placed_after" else column < moment)
    if violations:
        raise InvalidArgument(violations)
    return conditions


def search_statement(query: str, filt: queries_pb2.OrderFilter) -> tuple[sa.Select[Any], Any]:
    """SearchOrders' statement (without paging) and its integer rank expression (None without words)."""
    stmt = sa.select(*SUMMARY_COLUMNS).where(*_filter_conditions(filt))
    if query.strip():
        tsquery = sa.func.websearch_to_tsquery("simple", query)
        rank: Any = sa.cast(
            sa.func.round(sa.func.ts_rank(order_summaries.c.search, tsquery) * 1_000_000), sa.BigInteger
        )
        stmt = stmt.where(order_summaries.c.search.op("@@")(tsquery))
    else:
        rank = sa.literal(0, sa.BigInteger)
    stmt = stmt.add_columns(rank.label("rank")).order_by(
        rank.desc(), order_summaries.c.placed_at.desc(), order_summaries.c.order_id.desc()
    )
    return stmt, rank


def compiled(stmt: sa.ClauseElement) -> tuple[str, dict[str, Any]]:
    """An SQLAlchemy Core statement as psycopg SQL text and parameters (for statements built per call)."""
    result = stmt.compile(dialect=_DIALECT, compile_kwargs={"render_postcompile": True})
    return str(result), dict(result.params)


_DIALECT = postgresql_psycopg.dialect()
_COLUMN_LIST = ", ".join(column.name for column in SUMMARY_COLUMNS)
_CHANGE_COLUMN_LIST = ", ".join(column.name for column in order_changes.c)
ORDER_SQL = f"SELECT {_COLUMN_LIST} FROM order_summaries WHERE order_id = %s"
ORDERS_BY_IDS_SQL = f"SELECT {_COLUMN_LIST} FROM order_summaries WHERE order_id = ANY(%s)"
ORDERS_OF_CUSTOMER_SQL = (
    f"SELECT {_COLUMN_LIST} FROM order_summaries WHERE customer_id = %s ORDER BY placed_at, order_id"
)
CHANGES_AT_SQL = f"SELECT {_CHANGE_COLUMN_LIST} FROM order_changes WHERE stream_seq = ANY(%s) ORDER BY stream_seq"
CHANGES_OF_ORDERS_SQL = (
    f"SELECT {_CHANGE_COLUMN_LIST} FROM order_changes WHERE order_id = ANY(%s) AND stream_seq > %s ORDER BY stream_seq"
)
CHANGES_OF_CUSTOMER_SQL = (
    f"SELECT {_CHANGE_COLUMN_LIST} FROM order_changes WHERE customer_id = %s AND stream_seq > %s ORDER BY stream_seq"
)
POSITIONS_SQL = (  # one row per projector of a partitioned stream
    "SELECT max(last_stream_seq) AS applied, max(changes_kept_from) AS kept_from FROM projection_checkpoints"
    " HAVING count(*) > 0"
)
ORDER_VERSIONS_SQL = "SELECT order_id, version FROM order_summaries WHERE order_id = ANY(%s)"
PRODUCT_VERSIONS_SQL = "SELECT sku, version FROM product_views WHERE sku = ANY(%s)"
UNPUBLISHED_SQL = (
    "SELECT coalesce(max(outbox_backlog), 0) AS backlog, coalesce(max(outbox_oldest_seconds), 0) AS oldest"
    " FROM projection_checkpoints"
    " WHERE lag_measured_at > now() - interval '30 seconds' HAVING count(*) > 0"
)


def create_pool(url: str, size: int, timeout: float) -> AsyncConnectionPool:
    """The read connections: autocommit (each query is one statement: no BEGIN/ROLLBACK round trips,
    no SQLAlchemy per-checkout work) and prepared after a few uses. Opened by the caller."""
    return AsyncConnectionPool(
        libpq_url(url),
        min_size=size,
        max_size=size,
        timeout=timeout,
        kwargs={"autocommit": True, "application_name": "orders-query", "connect_timeout": 5},
        open=False,
        name="orders-query",
    )


class ReadModel:
    """Every query the QueryService runs, against the read database only.

    Reads run on a psycopg pool rather than through SQLAlchemy: on the hottest call (GetOrderSummary)
    SQLAlchemy's connection checkout, statement handling and reset-on-return cost about twice the
    CPU of the query itself. Statements built from a request's filters are still written with
    SQLAlchemy Core and compiled per call; the fixed ones are plain SQL.
    """

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def _rows(self, query: str, params: Sequence[Any] | dict[str, Any]) -> list[Any]:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=namedtuple_row)
            await cur.execute(query, params)
            return await cur.fetchall()

    async def order(self, order_id: str) -> queries_pb2.OrderSummary | None:
        rows = await self._rows(ORDER_SQL, (order_id,))
        return summary_message(rows[0]) if rows else None

    async def orders_by_ids(self, order_ids: Sequence[str]) -> list[queries_pb2.OrderSummary]:
        return [summary_message(row) for row in await self._rows(ORDERS_BY_IDS_SQL, (list(order_ids),))]

    async def orders_of_customer(self, customer_id: str) -> list[queries_pb2.OrderSummary]:
        return [summary_message(row) for row in await self._rows(ORDERS_OF_CUSTOMER_SQL, (customer_id,))]

    async def stream_orders(
        self, filt: queries_pb2.OrderFilter, newest_first: bool
    ) -> AsyncIterator[queries_pb2.OrderSummary]:
        """Every matching summary, fetched in keyset pages so memory stays bounded."""
        conditions = _filter_conditions(filt)
        key = sa.tuple_(order_summaries.c.placed_at, order_summaries.c.order_id)
        order = (
            (order_summaries.c.placed_at.desc(), order_summaries.c.order_id.desc())
            if newest_first
            else (order_summaries.c.placed_at, order_summaries.c.order_id)
        )
        last: tuple[datetime, str] | None = None
        while True:
            stmt = sa.select(*SUMMARY_COLUMNS).where(*conditions).order_by(*order).limit(STREAM_CHUNK)
            if last is not None:
                stmt = stmt.where(key < sa.tuple_(*last) if newest_first else key > sa.tuple_(*last))
            rows = await self._rows(*compiled(stmt))
            for row in rows:
                yield summary_message(row)
            if len(rows) < STREAM_CHUNK:
                return
            last = (rows[-1].placed_at, rows[-1].order_id)

    async def search(
        self, query: str, filt: queries_pb2.OrderFilter, size: int, token: str
    ) -> tuple[list[queries_pb2.OrderSummary], str]:
        """Ranked full-text search combined with the filters, in keyset pages.

        Results are ordered by (rank, placed_at, order_id), all descending; the page token holds the
        last row's key and a fingerprint of the query, so pages stay stable while orders arrive (a new
        order sorts before or after the cursor, never into a page already served).
        """
        check_text(query, "query", MAX_QUERY_LENGTH)
        stmt, rank = search_statement(query, filt)
        fingerprint = hashlib.sha256(query.encode() + filt.SerializeToString(deterministic=True)).hexdigest()[:16]
        if token:
            after = decode_page_token(token, {"q", "r", "t", "i"})
            try:
                if after["q"] != fingerprint:
                    raise ValueError("page token of a different query")
                rank_key, placed = after["r"], datetime.fromisoformat(after["t"])
                if not isinstance(rank_key, int) or not -(2**63) <= rank_key < 2**63 or placed.tzinfo is None:
                    raise ValueError("forged page token")
                key = (rank_key, placed, str(uuid.UUID(after["i"])))
            except (TypeError, ValueError, AttributeError):
                raise InvalidArgument(
                    [FieldViolation("page_token", "is not a page token returned by this call for this query")]
                ) from None
            columns = [order_summaries.c.placed_at, order_summaries.c.order_id]
            stmt = stmt.where(
                sa.tuple_(rank, *columns) < sa.tuple_(*key)
                if rank is not None
                else sa.tuple_(*columns) < sa.tuple_(*key[1:])
            )
        rows = await self._rows(*compiled(stmt.limit(size + 1)))
        next_token = ""
        if len(rows) > size:
            last = rows[size - 1]
            next_token = encode_page_token(
                {"q": fingerprint, "r": last.rank, "t": last.placed_at.isoformat(), "i": last.order_id}
            )
        return [summary_message(row) for row in rows[:size]], next_token

    async def products(
        self, size: int, token: str, in_stock_only: bool, name_prefix: str
    ) -> tuple[list[queries_pb2.ProductView], str]:
        """Products by SKU, keyset-paginated."""
        check_text(name_prefix, "name_prefix", MAX_NAME_LENGTH)
        stmt = sa.select(product_views).order_by(product_views.c.sku).limit(size + 1)
        if token:
            after = decode_page_token(token, {"after"})["after"]
            if not isinstance(after, str) or text_problem(after, MAX_SKU_LENGTH):
                raise InvalidArgument([FieldViolation("page_token", "is not a page token returned by this call")])
            stmt = stmt.where(product_views.c.sku > after)
        if in_stock_only:
            stmt = stmt.where(product_views.c.stock > 0)
        if name_prefix:
            escaped = name_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            stmt = stmt.where(product_views.c.name.ilike(escaped + "%", escape="\\"))
        rows = await self._rows(*compiled(stmt))
        next_token = encode_page_token({"after": rows[size - 1].sku}) if len(rows) > size else ""
        return [product_message(row) for row in rows[:size]], next_token

    async def changes_at(self, seqs: Sequence[int]) -> list[queries_pb2.OrderSummary]:
        """The order states recorded at these stream sequences, in sequence order."""
        return [summary_message(row) for row in await self._rows(CHANGES_AT_SQL, (list(seqs),))]

    async def changes_since(
        self, order_ids: Sequence[str], customer_id: str, after_seq: int
    ) -> list[queries_pb2.OrderSummary]:
        """Every recorded state of the selected orders after after_seq, in sequence order."""
        if order_ids:
            rows = await self._rows(CHANGES_OF_ORDERS_SQL, (list(order_ids), after_seq))
        else:
            rows = await self._rows(CHANGES_OF_CUSTOMER_SQL, (customer_id, after_seq))
        return [summary_message(row) for row in rows]

    async def positions(self) -> tuple[int, int]:
        """(highest stream sequence applied, first sequence from which the change log is complete)."""
        rows = await self._rows(POSITIONS_SQL, ())
        return (0, 0) if not rows else (int(rows[0][0]), int(rows[0][1]))

    async def unpublished(self) -> tuple[int, float]:
        """(events still in the command side's outbox, age of the oldest), as the projector's last lag
        report (of the last 30 s) gave them; (0, 0) when there is none."""
        rows = await self._rows(UNPUBLISHED_SQL, ())
        return (0, 0.0) if not rows else (int(rows[0][0]), float(rows[0][1]))

    async def versions(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Current read-model versions of the named aggregates (absent ones are left out)."""
        found: dict[tuple[str, str], int] = {}
        for kind, query in (("order", ORDER_VERSIONS_SQL), ("product", PRODUCT_VERSIONS_SQL)):
            idents = [ident for key_kind, ident in keys if key_kind == kind]
            if idents:
                found.update(((kind, ident), version) for ident, version in await self._rows(query, (idents,)))
        return found
