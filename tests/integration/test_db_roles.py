"""One PostgreSQL role per service: each can do its service's work and nothing more."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import grpc
import psycopg
import pytest
from sqlalchemy.engine import make_url

from orders import local_stack, roles
from orders.config import Settings
from orders.db import libpq_url
from orders.v1 import admin_pb2, admin_pb2_grpc, commands_pb2_grpc, queries_pb2, queries_pb2_grpc
from tests.support import Infra, add_product, isolated_settings, migrate, new_sku, place, publish_events, start_serving


def as_role(url: str, role: str) -> str:
    return make_url(url).set(username=role, password="pw-" + role).render_as_string(hide_password=False)


def denied(url: str, statement: str) -> bool:
    """True when PostgreSQL refuses statement (or the connection) for lack of privilege."""
    try:
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            conn.execute(statement)
    except (psycopg.errors.InsufficientPrivilege, psycopg.OperationalError):
        return True
    return False


def owned_by(url: str, role: str) -> int:
    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE r.rolname = %s", (role,)
        ).fetchone()
    return int(row[0]) if row else 0


def test_each_role_has_exactly_its_services_privileges(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    admin = isolated_settings(
        infra,
        nats_url=own_nats.url,
        command_db_password="pw-orders_command",
        projector_db_password="pw-orders_projector",
        query_db_password="pw-orders_query",
    )
    asyncio.run(migrate(admin))
    asyncio.run(roles.apply(admin))
    asyncio.run(roles.apply(admin))  # idempotent
    write, read = admin.write_database_url, admin.read_database_url
    command_w, projector_r, query_r = (
        as_role(write, roles.COMMAND),
        as_role(read, roles.PROJECTOR),
        as_role(read, roles.QUERY),
    )

    assert not denied(query_r, "SELECT count(*) FROM order_summaries")
    for statement in (
        "INSERT INTO product_views VALUES ('X', 'x', 1, 'EUR', 1, 1, 1, now())",
        "UPDATE order_summaries SET status = 'CANCELLED'",
        "DELETE FROM dead_letters",
        "CREATE TABLE sneaky (id int)",
        "TRUNCATE projection_checkpoints",
    ):
        assert denied(query_r, statement), statement
    assert denied(as_role(write, roles.QUERY), "SELECT 1")  # no access to the write database at all
    assert denied(as_role(read, roles.COMMAND), "SELECT 1")  # nor the command role to the read database
    assert denied(as_role(write, roles.PROJECTOR), "SELECT 1")
    assert denied(command_w, "CREATE TABLE sneaky (id int)")
    assert denied(command_w, "DROP TABLE outbox")
    assert denied(command_w, "UPDATE alembic_version SET version_num = 'x'")
    assert denied(projector_r, "UPDATE alembic_version SET version_num = 'x'")
    assert owned_by(write, roles.COMMAND) == 0 and owned_by(read, roles.COMMAND) == 0
    assert owned_by(read, roles.PROJECTOR) > 0

    # The services do their work as these roles, a rebuild included.
    settings = replace(
        admin,
        write_database_url=command_w,
        read_database_url=projector_r,
        query_database_url=query_r,
    )
    asyncio.run(publish_events(settings, []))
    procs = [start_serving(m, settings, tmp_path / m) for m in ("command_service", "projector", "query_service")]
    try:
        with (
            grpc.insecure_channel(settings.command_addr) as c,
            grpc.insecure_channel(settings.query_addr) as q,
            grpc.insecure_channel(settings.admin_addr) as a,
        ):
            sku = new_sku("R")
            add_product(commands_pb2_grpc.CommandServiceStub(c), sku, stock=4)
            order = place(commands_pb2_grpc.CommandServiceStub(c), "roles", (sku, 1))
            queries = queries_pb2_grpc.QueryServiceStub(q)
            request = queries_pb2.GetOrderSummaryRequest(
                order_id=order.order_id, consistency_token=order.consistency_token
            )
            assert queries.GetOrderSummary(request, timeout=10).summary.item_count == 1
            progress = list(
                admin_pb2_grpc.AdminServiceStub(a).RebuildReadModel(admin_pb2.RebuildReadModelRequest(), timeout=60)
            )
            assert progress[-1].swapped
            assert queries.GetOrderSummary(request, timeout=10).summary.item_count == 1  # new tables readable
        assert denied(query_r, "DELETE FROM order_summaries")  # and still not writable
    finally:
        for proc in procs:
            proc.stop()


def test_settings_point_the_query_service_at_its_own_url() -> None:
    settings = Settings(read_database_url="postgresql://a@h/r", query_database_url="postgresql://q@h/r")
    assert settings.query_database == "postgresql://q@h/r"
    assert Settings(read_database_url="postgresql://a@h/r").query_database == "postgresql://a@h/r"
    with pytest.raises(ValueError):
        Settings.from_env({"ORDERS_QUERY_DATABASE_URL": "mysql://x"}).query_database  # noqa: B018


def test_roles_are_made_on_each_server_when_the_write_and_read_databases_live_on_two(
    infra: Infra, tmp_path: Path
) -> None:
    read_server = local_stack.start_postgres(tmp_path / "read-server", durable=False)
    try:
        admin = replace(
            isolated_settings(infra),
            read_database_url=read_server.url("orders_read"),
            command_db_password="pw-orders_command",
            projector_db_password="pw-orders_projector",
            query_db_password="pw-orders_query",
        )
        asyncio.run(migrate(admin))
        asyncio.run(roles.apply(admin))
        write, read = admin.write_database_url, admin.read_database_url
        assert not denied(as_role(write, roles.COMMAND), "SELECT count(*) FROM outbox")
        assert not denied(as_role(read, roles.PROJECTOR), "SELECT count(*) FROM projection_checkpoints")
        assert not denied(as_role(read, roles.QUERY), "SELECT count(*) FROM order_summaries")
        assert denied(as_role(read, roles.COMMAND), "SELECT 1")  # not even made on the read server
        assert owned_by(read, roles.PROJECTOR) > 0
    finally:
        read_server.stop()
