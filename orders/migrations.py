"""Schema migrations (Alembic) for both databases, and the start-up check that refuses an old schema.

The write database's migrations live in `command_service/migrations`, the read database's in
`projector/migrations` (the projector owns the read schema). `orders migrate` runs both to their head.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.pool import NullPool

from orders.config import Settings
from orders.db import ensure_database, libpq_url, sqlalchemy_url

WRITE = "command_service:migrations"
READ = "projector:migrations"


class NotMigrated(RuntimeError):
    """The database's schema is missing or older than this code expects, or the database cannot hold it."""


class Unusable(NotMigrated):
    """The database exists but cannot hold the schema (it is not UTF8); `orders migrate` cannot fix that."""


REQUIRED_ENCODING = "UTF8"


def require_usable(url: str, what: str) -> None:
    """Raise Unusable unless the database in url stores text as UTF8.

    Under SQL_ASCII, for one, PostgreSQL returns text as raw bytes to the drivers and stores whatever
    bytes it is sent: names and search text would come back as bytes, or mangled.
    """
    with psycopg.connect(libpq_url(url), connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT pg_encoding_to_char(encoding)::bytea FROM pg_database WHERE datname = current_database()"
        ).fetchone()
    encoding = bytes(row[0]).decode("ascii") if row else "unknown"
    if encoding != REQUIRED_ENCODING:
        database = sa.make_url(url).database
        raise Unusable(
            f"the {what} database {database} has encoding {encoding}; the orders schema needs {REQUIRED_ENCODING}: "
            f"create it anew with CREATE DATABASE {database} ENCODING 'UTF8' TEMPLATE template0 (or drop it and "
            "let `orders migrate` create it), then run `orders migrate`"
        )


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
    """Raise NotMigrated unless the database is usable and at the head revision (call before serving)."""
    try:
        require_usable(url, what)
        current, head = revisions(url, location)
    except (sa.exc.OperationalError, psycopg.OperationalError) as exc:
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
    """Create both databases when missing (as UTF8) and bring their schemas to the head revision; raise
    Unusable, before changing anything, when an existing database is not UTF8."""
    targets = ((settings.write_database_url, WRITE, "write"), (settings.read_database_url, READ, "read"))
    for url, _, what in targets:
        if not await ensure_database(url):
            await asyncio.to_thread(require_usable, url, what)
    for url, location, _ in targets:
        await asyncio.to_thread(upgrade, url, location)
