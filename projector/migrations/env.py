"""Alembic environment of the read database."""

from alembic import context

from orders.migrations import run_env
from orders.read_model import metadata

run_env(context, metadata)
