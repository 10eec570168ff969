"""The read database's tables: the contract between the projector (writer) and the query service.

Every row records the aggregate `version` it reflects and the JetStream `stream_seq` of the last event
applied to it. The projector applies an event only when its version is exactly the stored version + 1,
so a row never skips or repeats a version.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, TSVECTOR

metadata = sa.MetaData()


def _summary_columns() -> list[sa.Column[Any]]:
    """The state of one order as queries show it (shared by the summaries and their change log)."""
    return [
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
    ]


order_summaries = sa.Table(
    "order_summaries",
    metadata,
    sa.Column("order_id", sa.Text, primary_key=True),
    *_summary_columns(),
    sa.Column("stream_seq", sa.BigInteger, nullable=False),
    # customer id, SKUs and product names, for SearchOrders
    sa.Column("search", TSVECTOR, nullable=False),
    sa.Index("order_summaries_customer_placed", "customer_id", "placed_at", "order_id"),
    sa.Index("order_summaries_status_placed", "status", "placed_at", "order_id"),
    sa.Index("order_summaries_placed", "placed_at", "order_id"),
    sa.Index("order_summaries_stream_seq", "stream_seq"),
    sa.Index("order_summaries_search", "search", postgresql_using="gin"),
)

# Every state an order summary went through, keyed by the stream sequence of the event that produced
# it: what a watch replays to a client that resumes from a sequence. Pruned after a retention.
order_changes = sa.Table(
    "order_changes",
    metadata,
    sa.Column("stream_seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("order_id", sa.Text, nullable=False),
    *_summary_columns(),
    sa.Index("order_changes_order", "order_id", "stream_seq"),
    sa.Index("order_changes_customer", "customer_id", "stream_seq"),
    sa.Index("order_changes_updated", "updated_at"),
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

# Progress of each projection: the highest stream sequence applied (rows carry their own), and the
# lag the projector last measured, which the query service reads for its health status.
projection_checkpoints = sa.Table(
    "projection_checkpoints",
    metadata,
    sa.Column("projection", sa.Text, primary_key=True),
    sa.Column("last_stream_seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("lag_events", sa.BigInteger),
    sa.Column("lag_seconds", sa.Float),
    sa.Column("lag_measured_at", sa.DateTime(timezone=True)),
    # Of lag_events and lag_seconds, the part still in the command side's outbox (as its relay reported it)
    sa.Column("outbox_backlog", sa.BigInteger),
    sa.Column("outbox_oldest_seconds", sa.Float),
    # order_changes holds every change at or above this sequence (older ones were pruned)
    sa.Column("changes_kept_from", sa.BigInteger, nullable=False, server_default="0"),
)

# Events the projector could not apply (status 'dead') and later events of the same aggregate held
# behind them ('parked'), with everything needed to inspect and replay them.
dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("stream_seq", sa.BigInteger, nullable=False, unique=True),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("aggregate_type", sa.Text, nullable=False),
    sa.Column("aggregate_id", sa.Text, nullable=False),
    sa.Column("aggregate_version", sa.BigInteger),  # NULL when the payload could not be decoded
    sa.Column("event_id", sa.Text),
    sa.Column("status", sa.Text, nullable=False),  # dead | parked
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("deliveries", sa.Integer, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("headers", JSONB, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Index("dead_letters_aggregate", "aggregate_type", "aggregate_id", "stream_seq"),
)

# NOTIFY channel the projector signals after each commit; the payload lists what changed, or is
# RESYNC_PAYLOAD when every waiter and watcher must re-read (after a rebuild swapped the tables).
CHANGES_CHANNEL = "orders_read_changes"
RESYNC_PAYLOAD = "resync"
PROJECTED_TABLES = ("order_summaries", "product_views")
PROJECTION_NAME = "order_summaries"  # its row in projection_checkpoints (one per partition when partitioned)


def projection_name(partitions: int, partition: int) -> str:
    """The projection_checkpoints row of a projector: one per partition, so that no two projectors of a
    partitioned stream update one row (which would serialise their commits)."""
    return f"{PROJECTION_NAME}.p{partition}" if partitions else PROJECTION_NAME


def projection_names(partitions: int) -> list[str]:
    """Every projector's row of the partitioning: the projection is caught up when all of them are."""
    return [projection_name(partitions, partition) for partition in range(max(partitions, 1))]
