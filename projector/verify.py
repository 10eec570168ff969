"""Row-by-row comparison of the read model with the write database (the source of truth).

The read model is correct when, once the projector has caught up, every order and product of the
write database has exactly one read row with the same values and version, and there is no other row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from orders.db import libpq_url

_WRITE_ORDERS = """
SELECT o.id::text, o.customer_id, o.status, o.total_minor, o.currency, o.cancel_reason, o.version, o.created_at,
       coalesce(jsonb_agg(jsonb_build_object('sku', i.sku, 'name', i.name, 'quantity', i.quantity,
                                             'unit_price_minor', i.unit_price_minor) ORDER BY i.line_no)
                FILTER (WHERE i.sku IS NOT NULL), '[]'::jsonb)
FROM orders o LEFT JOIN order_items i ON i.order_id = o.id
GROUP BY o.id
"""
_READ_ORDERS = """
SELECT order_id, customer_id, status, total_minor, currency, cancel_reason, version, placed_at, lines
FROM order_summaries
"""
_WRITE_PRODUCTS = "SELECT sku, name, unit_price_minor, currency, stock, version FROM products"
_READ_PRODUCTS = "SELECT sku, name, unit_price_minor, currency, stock, version FROM product_views"
_ORDER_FIELDS = ("customer_id", "status", "total_minor", "currency", "cancel_reason", "version", "placed_at", "lines")
_PRODUCT_FIELDS = ("name", "unit_price_minor", "currency", "stock", "version")


@dataclass
class Report:
    orders_checked: int = 0
    products_checked: int = 0
    differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences


def _compare(
    kind: str,
    fields: tuple[str, ...],
    source: dict[str, tuple[Any, ...]],
    read: dict[str, tuple[Any, ...]],
    report: Report,
) -> None:
    for key in sorted(source.keys() - read.keys()):
        report.differences.append(f"{kind} {key}: missing from the read model")
    for key in sorted(read.keys() - source.keys()):
        report.differences.append(f"{kind} {key}: in the read model but not in the write database")
    for key in sorted(source.keys() & read.keys()):
        for name, want, got in zip(fields, source[key], read[key], strict=True):
            if want != got:
                report.differences.append(
                    f"{kind} {key}: {name} is {got!r} in the read model, {want!r} in the write database"
                )


async def _fetch(url: str, query: str) -> dict[str, tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        cur = await conn.execute(query)
        return {row[0]: tuple(row[1:]) for row in await cur.fetchall()}


async def verify(write_database_url: str, read_database_url: str) -> Report:
    report = Report()
    write_orders = await _fetch(write_database_url, _WRITE_ORDERS)
    read_orders = await _fetch(read_database_url, _READ_ORDERS)
    _compare("order", _ORDER_FIELDS, write_orders, read_orders, report)
    write_products = await _fetch(write_database_url, _WRITE_PRODUCTS)
    read_products = await _fetch(read_database_url, _READ_PRODUCTS)
    _compare("product", _PRODUCT_FIELDS, write_products, read_products, report)
    report.orders_checked = len(write_orders)
    report.products_checked = len(write_products)
    return report
