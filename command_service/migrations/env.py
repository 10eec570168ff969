"""Alembic environment of the write database."""

from alembic import context

from command_service.schema import metadata
from orders.migrations import run_env

run_env(context, metadata)
