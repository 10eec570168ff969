"""Alembic migrations build exactly the schema the code declares, and services refuse an unmigrated database."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from command_service.schema import metadata as write_metadata
from orders import local_stack, migrations
from orders.db import ensure_database, sqlalchemy_url
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
