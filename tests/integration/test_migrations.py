"""Alembic migrations build exactly the schema the code declares, and services refuse an unmigrated database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from command_service.schema import metadata as write_metadata
from orders import local_stack, migrations
from orders.db import ensure_database, libpq_url, sqlalchemy_url
from orders.read_model import metadata as read_metadata
from tests.support import Infra, isolated_settings, migrate


def schema_differences(url: str, metadata: sa.MetaData) -> list[object]:
    engine = sa.create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), metadata))
    finally:
        engine.dispose()


def test_migrations_build_the_declared_schema_and_are_idempotent(infra: Infra) -> None:
    settings = isolated_settings(infra)
    asyncio.run(migrate(settings))
    asyncio.run(migrate(settings))  # a second run changes nothing
    for url, location, metadata in (
        (settings.write_database_url, migrations.WRITE, write_metadata),
        (settings.read_database_url, migrations.READ, read_metadata),
    ):
        current, head = migrations.revisions(url, location)
        assert current == head is not None
        assert schema_differences(url, metadata) == []


def test_services_refuse_to_start_on_an_unmigrated_database(infra: Infra, tmp_path: Path) -> None:
    settings = isolated_settings(infra)
    asyncio.run(ensure_database(settings.read_database_url))  # exists but empty; the write database does not
    for module, expected in (
        ("command_service", "does not exist"),
        ("projector", "has no schema"),
        ("query_service", "has no schema"),
    ):
        proc = local_stack.start_service(module, settings.to_env(), tmp_path / module)
        try:
            assert proc.proc.wait(60) == 1
        finally:
            proc.stop()
        log = proc.log_path.read_text()
        assert expected in log and "run `orders migrate`" in log, log


def test_a_database_that_is_not_utf8_is_refused_by_migrate_and_by_every_service(tmp_path: Path) -> None:
    """On a PostgreSQL whose default encoding is SQL_ASCII: `orders migrate` refuses an existing SQL_ASCII
    database in one line and changes nothing, the services refuse it at start, and databases that
    migrate creates itself are UTF8 and migrate."""
    pg = local_stack.start_postgres(tmp_path / "pg", durable=False, encoding="SQL_ASCII")
    try:
        admin = libpq_url(pg.url("postgres"))
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE ascii_write")  # inherits the server's SQL_ASCII
        refused = replace(
            isolated_settings(Infra(pg.url, "nats://127.0.0.1:1")), write_database_url=pg.url("ascii_write")
        )
        env = {**os.environ, **refused.to_env()}
        done = subprocess.run(
            [sys.executable, "-m", "orders.cli", "migrate"], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "ascii_write has encoding SQL_ASCII" in done.stderr and "needs UTF8" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        with psycopg.connect(libpq_url(refused.write_database_url)) as conn:
            assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
        proc = local_stack.start_service("command_service", refused.to_env(), tmp_path / "command")
        try:
            assert proc.proc.wait(60) == 1
        finally:
            proc.stop()
        assert "has encoding SQL_ASCII" in proc.log_path.read_text()

        created = isolated_settings(Infra(pg.url, "nats://127.0.0.1:1"))  # databases that do not exist yet
        asyncio.run(migrate(created))
        for url in (created.write_database_url, created.read_database_url):
            with psycopg.connect(libpq_url(url)) as conn:
                row = conn.execute(
                    "SELECT pg_encoding_to_char(encoding)::bytea FROM pg_database WHERE datname = current_database()"
                ).fetchone()
            assert row is not None and bytes(row[0]) == b"UTF8"
            migrations.require_current(
                url, migrations.WRITE if url == created.write_database_url else migrations.READ, ""
            )
    finally:
        pg.stop()


def test_a_second_server_on_the_same_data_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    pg = local_stack.start_postgres(tmp_path / "pg", durable=False)
    nats = local_stack.start_nats(tmp_path / "nats")
    try:
        with pytest.raises(
            local_stack.AlreadyRunning, match=rf"PostgreSQL already runs on .* \(pid {pg.process.pid}\)"
        ):
            local_stack.start_postgres(tmp_path / "pg", durable=False)
        with pytest.raises(
            local_stack.AlreadyRunning, match=rf"nats-server already runs on .* \(pid {nats.process.pid}\)"
        ):
            local_stack.start_nats(tmp_path / "nats")
    finally:
        nats.stop()
        pg.stop()
