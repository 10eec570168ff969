"""Helpers shared by the tests: the running system's handles, isolated settings, bounded waits."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from command_service.schema import metadata as write_metadata
from orders import db, local_stack
from orders.config import Settings
from orders.read_model import metadata as read_metadata
from orders.v1 import commands_pb2_grpc, queries_pb2_grpc

T = TypeVar("T")


@dataclass
class Infra:
    """Where the tests' PostgreSQL and NATS are: an admin URL template and a NATS URL."""

    postgres_url: Callable[[str], str]
    nats_url: str


@dataclass
class Stack:
    """The running system: settings, service processes and gRPC stubs."""

    settings: Settings
    processes: dict[str, local_stack.ManagedProcess]
    commands: commands_pb2_grpc.CommandServiceStub
    queries: queries_pb2_grpc.QueryServiceStub
    log_dir: Path

    def start(self, module: str) -> local_stack.ManagedProcess:
        proc = local_stack.start_service(module, self.settings.to_env(), self.log_dir)
        self.processes[module] = proc
        return proc


def isolated_settings(infra: Infra, **overrides: Any) -> Settings:
    """Settings for one isolated system: its own databases, stream, consumer and ports."""
    suffix = uuid.uuid4().hex[:10]
    values: dict[str, Any] = dict(
        write_database_url=infra.postgres_url(f"orders_write_{suffix}"),
        read_database_url=infra.postgres_url(f"orders_read_{suffix}"),
        nats_url=infra.nats_url,
        command_addr=f"127.0.0.1:{local_stack.free_port()}",
        query_addr=f"127.0.0.1:{local_stack.free_port()}",
        stream=f"ORDERS_EVENTS_{suffix}",
        consumer=f"projector_{suffix}",
        log_level="DEBUG",
    )
    return Settings(**(values | overrides))


async def migrate(settings: Settings) -> None:
    await db.create_schema(settings.write_database_url, write_metadata)
    await db.create_schema(settings.read_database_url, read_metadata)


def serving_or_raise(address: str, processes: dict[str, local_stack.ManagedProcess]) -> bool:
    for proc in processes.values():
        if not proc.alive():
            raise RuntimeError(f"{proc.name} died:\n{proc.log_tail()}")
    return local_stack.grpc_serving(address)


def eventually(probe: Callable[[], T | None], timeout: float = 5.0, what: str = "condition") -> T:
    """Call probe until it returns a truthy value (returned), or fail after timeout seconds."""
    result: list[T] = []

    def check() -> bool:
        value = probe()
        if value:
            result.append(value)
            return True
        return False

    local_stack.wait_until(check, timeout, what, interval=0.05)
    return result[0]
