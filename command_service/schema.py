"""The write database's tables: the source of truth for business rules, plus outbox and idempotency."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = sa.MetaData()

products = sa.Table(
    "products",
    metadata,
    sa.Column("sku", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("unit_price_minor", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.Text, nullable=False),
    sa.Column("stock", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.CheckConstraint("stock >= 0", name="products_stock_not_negative"),
    sa.CheckConstraint("unit_price_minor >= 0", name="products_price_not_negative"),
)

orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", UUID(as_uuid=False), primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),  # PLACED | CANCELLED
    sa.Column("total_minor", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.Text, nullable=False),
    sa.Column("cancel_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("orders_customer", "customer_id", "created_at"),
)

order_items = sa.Table(
    "order_items",
    metadata,
    sa.Column("order_id", UUID(as_uuid=False), sa.ForeignKey("orders.id"), primary_key=True),
    sa.Column("line_no", sa.Integer, primary_key=True),
    sa.Column("sku", sa.Text, sa.ForeignKey("products.sku"), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("quantity", sa.BigInteger, nullable=False),
    sa.Column("unit_price_minor", sa.BigInteger, nullable=False),
)

# Events waiting for publication: the relay reads `ORDER BY id` from the start, never a cursor over id
# (ids are taken before commit, and a late commit would be skipped), and deletes a row once JetStream
# acknowledged it.
outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("event_id", UUID(as_uuid=False), nullable=False, unique=True),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("headers", JSONB, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

# One row per request_id: the command, a hash of its payload and the response it produced.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("request_id", sa.Text, primary_key=True),
    sa.Column("command", sa.Text, nullable=False),
    sa.Column("request_hash", sa.LargeBinary, nullable=False),
    sa.Column("response", sa.LargeBinary),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
