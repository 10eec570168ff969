"""projection lag counts the outbox backlog

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 22:23:01.877830
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("projection_checkpoints", sa.Column("outbox_backlog", sa.BigInteger(), nullable=True))
    op.add_column("projection_checkpoints", sa.Column("outbox_oldest_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("projection_checkpoints", "outbox_oldest_seconds")
    op.drop_column("projection_checkpoints", "outbox_backlog")
