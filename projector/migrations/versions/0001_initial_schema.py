"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26 22:03:25.251389
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("stream_seq", sa.BigInteger(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("aggregate_type", sa.Text(), nullable=False),
        sa.Column("aggregate_id", sa.Text(), nullable=False),
        sa.Column("aggregate_version", sa.BigInteger(), nullable=True),
        sa.Column("event_id", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("headers", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("stream_seq"),
    )
    op.create_index(
        "dead_letters_aggregate", "dead_letters", ["aggregate_type", "aggregate_id", "stream_seq"], unique=False
    )
    op.create_table(
        "order_changes",
        sa.Column("stream_seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("lines", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("item_count", sa.BigInteger(), nullable=False),
        sa.Column("total_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("placed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancel_reason", sa.Text(), server_default="", nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("stream_seq"),
    )
    op.create_index("order_changes_customer", "order_changes", ["customer_id", "stream_seq"], unique=False)
    op.create_index("order_changes_order", "order_changes", ["order_id", "stream_seq"], unique=False)
    op.create_index("order_changes_updated", "order_changes", ["updated_at"], unique=False)
    op.create_table(
        "order_summaries",
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("lines", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("item_count", sa.BigInteger(), nullable=False),
        sa.Column("total_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("placed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancel_reason", sa.Text(), server_default="", nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("stream_seq", sa.BigInteger(), nullable=False),
        sa.Column("search", postgresql.TSVECTOR(), nullable=False),
        sa.PrimaryKeyConstraint("order_id"),
    )
    op.create_index(
        "order_summaries_customer_placed", "order_summaries", ["customer_id", "placed_at", "order_id"], unique=False
    )
    op.create_index("order_summaries_placed", "order_summaries", ["placed_at", "order_id"], unique=False)
    op.create_index("order_summaries_search", "order_summaries", ["search"], unique=False, postgresql_using="gin")
    op.create_index(
        "order_summaries_status_placed", "order_summaries", ["status", "placed_at", "order_id"], unique=False
    )
    op.create_index("order_summaries_stream_seq", "order_summaries", ["stream_seq"], unique=False)
    op.create_table(
        "product_views",
        sa.Column("sku", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("unit_price_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("stock", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("stream_seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sku"),
    )
    op.create_table(
        "projection_checkpoints",
        sa.Column("projection", sa.Text(), nullable=False),
        sa.Column("last_stream_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lag_events", sa.BigInteger(), nullable=True),
        sa.Column("lag_seconds", sa.Float(), nullable=True),
        sa.Column("lag_measured_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("changes_kept_from", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("projection"),
    )


def downgrade() -> None:
    op.drop_table("projection_checkpoints")
    op.drop_table("product_views")
    op.drop_index("order_summaries_stream_seq", table_name="order_summaries")
    op.drop_index("order_summaries_status_placed", table_name="order_summaries")
    op.drop_index("order_summaries_search", table_name="order_summaries", postgresql_using="gin")
    op.drop_index("order_summaries_placed", table_name="order_summaries")
    op.drop_index("order_summaries_customer_placed", table_name="order_summaries")
    op.drop_table("order_summaries")
    op.drop_index("order_changes_updated", table_name="order_changes")
    op.drop_index("order_changes_order", table_name="order_changes")
    op.drop_index("order_changes_customer", table_name="order_changes")
    op.drop_table("order_changes")
    op.drop_index("dead_letters_aggregate", table_name="dead_letters")
    op.drop_table("dead_letters")
