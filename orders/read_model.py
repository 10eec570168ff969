"""The read database's tables: the contract between the projector (writer) and the query service.

Every row records the aggregate `version` it reflects and the JetStream `stream_seq` of the last event
applied to it. The projector applies an event only when its version is exactly the stored version + 1,
so a row never skips or repeats a version.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, TSVECTOR

metadata = sa.MetaData()

order_summaries = sa.Table(
    "order_summaries",
    metadata,
    sa.Column("order_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),  # PLACED | CANCELLED
    # [{"sku", "name", "quantity", "unit_price_minor"}] in request order
    sa.Column("lines", JSONB, nullable=False),
    sa.Column("item_count", sa.BigInteger, nullable=False),
    sa.Column("total_minor", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.Text, nullable=False),
    sa.Column("placed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("cancel_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("stream_seq", sa.BigInteger, nullable=False),
    # customer id, SKUs and product names, for SearchOrders
    sa.Column("search", TSVECTOR, nullable=False),
    sa.Index("order_summaries_customer_placed", "customer_id", "placed_at", "order_id"),
    sa.Index("order_summaries_status_placed", "status", "placed_at", "order_id"),
    sa.Index("order_summaries_placed", "placed_at", "order_id"),
    sa.Index("order_summaries_stream_seq", "stream_seq"),
    sa.Index("order_summaries_search", "search", postgresql_using="gin"),
)

product_views = sa.Table(
    "product_views",
    metadata,
    sa.Column("sku", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("unit_price_minor", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.Text, nullable=False),
    sa.Column("stock", sa.BigInteger, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("stream_seq", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# Highest stream sequence applied by each projection (for lag reporting; rows carry their own).
projection_checkpoints = sa.Table(
    "projection_checkpoints",
    metadata,
    sa.Column("projection", sa.Text, primary_key=True),
    sa.Column("last_stream_seq", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# NOTIFY channel the projector signals after each commit; the payload lists what changed.
CHANGES_CHANNEL = "orders_read_changes"
