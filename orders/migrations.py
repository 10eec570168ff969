"""Schema migrations (Alembic) for both databases, and the start-up check that refuses an old schema.

The write database's migrations live in `command_service/migrations`, the read database's in
`projector/migrations` (the projector owns the read schema). `orders migrate` runs both to their head.
"""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.pool import NullPool

from orders.config import Settings
from orders.db import ensure_database, sqlalchemy_url

WRITE = "command_service:migrations"
READ = "projector:migrations"


class NotMigrated(RuntimeError):
    """The database's schema is missing or older than this code expects."""


def config(url: str, location: str) -> Config:
    config = Config()
    config.set_main_option("script_location", location)
    config.attributes["url"] = url
    return config


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(sqlalchemy_url(url), poolclass=NullPool)


def run_env(context: Any, metadata: sa.MetaData) -> None:
    """The body of each migrations/env.py: run the migrations online on the configured database."""
    engine = _engine(context.config.attributes["url"])
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=metadata, compare_server_default=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


def upgrade(url: str, location: str) -> None:
    command.upgrade(config(url, location), "head")


def revisions(url: str, location: str) -> tuple[str | None, str | None]:
    """(the database's current revision, the code's head revision)."""
    head = ScriptDirectory.from_config(config(url, location)).get_current_head()
    engine = _engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision(), head
    finally:
        engine.dispose()


def require_current(url: str, location: str, what: str) -> None:
    """Raise NotMigrated unless the database is at the head revision (call before serving)."""
    try:
        current, head = revisions(url, location)
    except sa.exc.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise
        raise NotMigrated(
            f"the {what} database {sa.make_url(url).database} does not exist: run `orders migrate` with the "
            "same ORDERS_* settings"
        ) from None
    if current != head:
        state = "has no schema" if current is None else f"is at schema revision {current}"
        raise NotMigrated(
            f"the {what} database {sa.make_url(url).database} {state}, this version needs {head}: "
            "run `orders migrate` (or `python -m orders.cli migrate`) with the same ORDERS_* settings"
        )


async def migrate(settings: Settings) -> None:
    """Create both databases when missing and bring their schemas to the head revision."""
    for url, location in ((settings.write_database_url, WRITE), (settings.read_database_url, READ)):
        await ensure_database(url)
        await asyncio.to_thread(upgrade, url, location)
