"""What the benchmark scripts share: a local system to measure, percentiles, the machine's description."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orders import local_stack  # noqa: E402
from orders.config import Settings  # noqa: E402
from tests.support import add_product, migrate, start_serving  # noqa: E402


@dataclass
class LocalSystem:
    """Embedded PostgreSQL and NATS with durable settings (as `orders up` runs them), plus services."""

    settings: Settings
    work: Path
    processes: list[local_stack.ManagedProcess] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)  # what a benchmark adds (e.g. another address)

    def start(self, *modules: str, **overrides: Any) -> None:
        """Start service processes (with setting overrides) and wait for each to answer SERVING."""
        settings = Settings(**{**self.settings.__dict__, **overrides})
        for module in modules:
            self.processes.append(start_serving(module, settings, self.work / "logs"))

    def stop(self, module: str) -> None:
        """Stop the (first started) process of module."""
        proc = next(p for p in self.processes if p.name == module)
        proc.stop()
        self.processes.remove(proc)


def seed_products(system: LocalSystem, skus: list[str], stock: int) -> None:
    """Catalog products with plenty of stock, through the CommandService."""
    import grpc

    from orders.v1 import commands_pb2_grpc

    with grpc.insecure_channel(system.settings.command_addr) as channel:
        stub = commands_pb2_grpc.CommandServiceStub(channel)
        for sku in skus:
            add_product(stub, sku, stock=stock, price=500, name=f"Bench {sku}")


@contextlib.contextmanager
def local_system(work: Path, **overrides: Any) -> Iterator[LocalSystem]:
    pg = local_stack.start_postgres(work / "postgres")
    nats = local_stack.start_nats(work / "nats")
    system = LocalSystem(
        Settings(
            **{
                "write_database_url": pg.url("bench_write"),
                "read_database_url": pg.url("bench_read"),
                "nats_url": nats.url,
                **local_stack.free_addresses(),
                "stream": "BENCH_EVENTS",
                "log_level": "WARNING",
                "auth": "off",
                **overrides,
            }
        ),
        work,
    )
    try:
        asyncio.run(migrate(system.settings))
        yield system
    finally:
        for proc in reversed(system.processes):
            proc.stop()
        nats.stop()
        pg.stop()


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) by the nearest-rank method; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, Any]:
    """Cores, memory and versions of what the figures were measured with."""
    memory_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        memory_kb = int(meminfo.readline().split()[1])
    postgres = subprocess.run(
        [str(local_stack._postgres_bin() / "postgres"), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    nats = subprocess.run(
        [local_stack.nats_server_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgres": postgres,
        "nats_server": nats,
    }
