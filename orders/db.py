"""Database plumbing shared by the services: engines from plain URLs, schema set-up, error classes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def sqlalchemy_url(url: str) -> str:
    """postgresql://… (what operators write) → postgresql+psycopg://… (what SQLAlchemy needs)."""
    return make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """Any accepted database URL as a plain libpq connection string (for psycopg directly)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_engine(url: str, pool_size: int, application_name: str) -> AsyncEngine:
    """An async engine on psycopg 3 with a bounded pool and liveness checks on checkout."""
    return create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=0,
        # No pre-ping round trip per checkout: a connection broken by a database restart fails one
        # statement (UNAVAILABLE, retryable), and SQLAlchemy then recycles every older pooled connection.
        pool_pre_ping=False,
        pool_timeout=10,
        connect_args={"application_name": application_name, "connect_timeout": 5},
    )


@contextlib.asynccontextmanager
async def driver_transaction(engine: AsyncEngine) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled connection's psycopg driver connection inside one transaction, for hot paths that skip
    SQLAlchemy Core's per-statement work (and may use pipeline mode)."""
    async with engine.begin() as conn:
        raw = await conn.get_raw_connection()
        yield raw.driver_connection  # type: ignore[misc]


def is_unavailable(exc: BaseException) -> bool:
    """True when the error means the database cannot be reached (retryable), not a bad statement."""
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig or exc
    if isinstance(exc, sa_exc.TimeoutError):  # pool exhausted or connect timed out
        return True
    return isinstance(exc, (psycopg.OperationalError, OSError, ConnectionError))


async def ensure_database(url: str) -> bool:
    """Create the database named in url when missing (connecting to the 'postgres' database), as UTF8
    even where the server's default encoding is another (then with the C locale, which fits any encoding).

    Returns True when it was created.
    """
    target = make_url(url)
    admin = libpq_url(target.set(database="postgres").render_as_string(hide_password=False))
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        cur = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target.database,))
        if await cur.fetchone():
            return False
        create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target.database or ""))
        cur = await conn.execute(
            "SELECT pg_encoding_to_char(encoding)::bytea FROM pg_database WHERE datname = 'template1'"
        )
        row = await cur.fetchone()
        if row is None or bytes(row[0]) != b"UTF8":  # e.g. a SQL_ASCII server: this database is UTF8 all the same
            create += sql.SQL(" ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
        try:
            await conn.execute(create)
        except psycopg.errors.DuplicateDatabase:
            return False
        return True
