"""What the benchmark scripts share: a local system to measure, percentiles, the machine's description."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orders import local_stack
from orders.config import Settings
from tests.support import add_product, children, migrate, start_serving

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LocalSystem:
    """Embedded PostgreSQL and NATS with durable settings (as `orders up` runs them), plus services."""

    settings: Settings
    work: Path
    processes: list[local_stack.ManagedProcess] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)  # what a benchmark adds (e.g. another address)
    infra_pids: dict[str, int] = field(default_factory=dict)  # "postgres" (the postmaster), "nats"
    local: bool = True  # False: the endpoints in settings belong to a system running elsewhere
    order_ids: list[str] = field(default_factory=list)  # orders of the read model the queries ask for
    command_addrs: list[str] = field(default_factory=list)  # every command service process (local)
    postgres: local_stack.LocalPostgres | None = None  # the embedded PostgreSQL (local systems)

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
    from orders import security
    from orders.v1 import commands_pb2_grpc

    settings = system.settings
    with security.client_channel(settings.command_addr, settings) as channel:
        stub = commands_pb2_grpc.CommandServiceStub(channel)
        for sku in skus:
            add_product(
                stub, sku, stock=stock, price=500, name=f"Bench {sku}", metadata=security.call_metadata(settings)
            )


def exit_on_sigterm() -> None:
    """Make SIGTERM exit like Ctrl-C does, through every `finally`, so that a benchmark that is killed
    still stops the servers and services it started."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextlib.contextmanager
def local_system(work: Path, **overrides: Any) -> Iterator[LocalSystem]:
    """Embedded PostgreSQL and NATS for one benchmark, stopped (with every service started on it) when
    the block ends (see `exit_on_sigterm`)."""
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
                "workers": 1,
                **overrides,
            }
        ),
        work,
        infra_pids={"postgres": pg.process.pid, "nats": nats.process.pid},
        postgres=pg,
    )
    try:
        asyncio.run(migrate(system.settings))
        yield system
    finally:
        for proc in reversed(system.processes):
            proc.stop()
        nats.stop()
        pg.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_children(pid: int) -> list[int]:
    """pid and its direct children (PostgreSQL's backends are children of the postmaster)."""
    return [pid, *children(pid)]


def cpu_by_component(system: LocalSystem) -> dict[str, float]:
    """CPU seconds used so far by each service process, PostgreSQL (all backends) and nats-server."""
    usage = {proc.name: 0.0 for proc in system.processes}
    for proc in system.processes:  # a service with workers: its supervisor and each worker
        usage[proc.name] += sum(cpu_seconds(pid) for pid in with_children(proc.pid))
    for name, pid in system.infra_pids.items():
        usage[name] = sum(cpu_seconds(p) for p in with_children(pid))
    return usage


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


def gather_results(results: Any, procs: Sequence[Any], outputs: list[Any]) -> bool:
    """Move whatever client processes have sent on `results` into outputs; True once each sent its one.

    Results must be read while the processes run: a child cannot exit before the data it queued has been
    read from the pipe, so waiting for it to exit first deadlocks once a result exceeds the pipe buffer.
    Raises if a process ended with an error before sending its result.
    """
    while True:
        try:
            outputs.append(results.get_nowait())
        except queue.Empty:
            break
    if len(outputs) < len(procs):
        failed = [p for p in procs if p.exitcode not in (None, 0)]
        if failed:
            raise RuntimeError(f"client process {failed[0].pid} exited with {failed[0].exitcode} before its result")
    return len(outputs) >= len(procs)


def collect_results(results: Any, procs: Sequence[Any], timeout: float) -> list[Any]:
    """Every process's one result (read as they arrive), then the processes joined."""
    outputs: list[Any] = []
    deadline = time.monotonic() + timeout
    while not gather_results(results, procs, outputs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(procs) - len(outputs)} client processes sent no result within {timeout:g}s")
        time.sleep(0.05)
    for proc in procs:
        proc.join(30)
    return outputs
