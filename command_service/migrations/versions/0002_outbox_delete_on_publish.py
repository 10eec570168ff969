"""outbox rows are deleted once published

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 09:40:00.000000

The relay deletes a row as soon as JetStream acknowledged it, instead of marking it published and
deleting it after a retention period. Rows already published are deleted here; unpublished ones stay.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DELETE FROM outbox WHERE published_at IS NOT NULL")
    op.drop_index("outbox_unpublished", table_name="outbox", postgresql_where=sa.text("published_at IS NULL"))
    op.drop_column("outbox", "published_at")


def downgrade() -> None:
    op.add_column("outbox", sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "outbox_unpublished", "outbox", ["id"], unique=False, postgresql_where=sa.text("published_at IS NULL")
    )
