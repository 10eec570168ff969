"""`orders up`: PostgreSQL, NATS, the three services and the gateway on this machine, supervised until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import importlib.util
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from orders import endpoints, jetstream, local_stack, migrations
from orders.config import Settings
from orders.workers import available_cores


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """Start PostgreSQL, NATS and the three services; stop everything on Ctrl-C or SIGTERM."""
    data_dir = Path(args.data_dir or settings.data_dir)
    already = endpoints.running(data_dir)
    if already is not None:
        print(
            f"orders up already runs in {data_dir.resolve()} ({already.describe()}): use it, stop it (Ctrl-C in its "
            "terminal, or kill that pid), or give another --data-dir",
            file=sys.stderr,
        )
        return 1
    if args.read_replicas and args.external:
        print("orders up: --read-replicas replicates the PostgreSQL it starts (not with --external)", file=sys.stderr)
        return 2
    started: list[local_stack.ManagedProcess] = []
    infra: list[Any] = []
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        if args.external:
            print(f"using PostgreSQL {settings.write_database_url} / {settings.read_database_url}")
            print(f"using NATS {settings.nats_url}")
        else:
            print(f"starting PostgreSQL and NATS (data in {data_dir.resolve()}) …", flush=True)
            pg = local_stack.start_postgres(data_dir / "postgres")
            infra.append(pg)
            nats = local_stack.start_nats(data_dir / "nats")
            infra.append(nats)
            settings = dataclasses.replace(
                settings,
                write_database_url=pg.url("orders_write"),
                read_database_url=pg.url("orders_read"),
                nats_url=nats.url,
            )
            print(f"PostgreSQL  {pg.url('')}  (pid {pg.process.pid})")
            print(f"NATS        {nats.url}  (pid {nats.process.pid}, JetStream)")
        if settings.auth == "on" and not (settings.auth_tokens or settings.auth_tokens_file):
            settings = dataclasses.replace(settings, auth="off")
            print("authentication off: a local stack (set ORDERS_AUTH_TOKENS_FILE to require tokens)")
        if args.workers is not None:
            if args.workers < 0:
                print("orders up: --workers must be 0 (one per core) or more", file=sys.stderr)
                return 2
            settings = dataclasses.replace(settings, workers=args.workers)
        if args.projectors > 1:  # one projector per partition of the stream
            settings = dataclasses.replace(settings, partitions=args.projectors, partition=0)
        left = asyncio.run(_undrained(settings))
        if left:
            waiting = ", ".join(f"{n} events for {name}" for name, n in sorted(left.items()))
            print(
                f"orders up: the stream still holds {waiting}: consumers of the previous run's --projectors, "
                "which the new number would never apply. Run with that number until `orders lag` shows 0, "
                "then change it.",
                file=sys.stderr,
            )
            return 1
        asyncio.run(migrations.migrate(settings))
        logs = data_dir / "logs"
        services: list[tuple[str, Settings, Path, str]] = [  # module, its settings, log directory, note
            ("command_service", settings, logs, ""),
            ("query_service", settings, logs, ""),
        ]
        for n in range(1, args.read_replicas + 1):
            replica = local_stack.start_replica(infra[0], data_dir / f"postgres-replica{n}")
            infra.append(replica)
            print(f"PostgreSQL  {replica.url('')}  (pid {replica.process.pid}, read replica {n})")
            on_replica = dataclasses.replace(
                settings,
                query_database_url=replica.url("orders_read"),
                query_addr=f"127.0.0.1:{local_stack.free_port()}",
                query_metrics_addr=f"127.0.0.1:{local_stack.free_port()}",
            )
            services.append(("query_service", on_replica, logs / f"replica{n}", f"on read replica {n}"))
        for partition in range(settings.partitions or 1):
            own = settings
            if partition:
                own = dataclasses.replace(
                    settings,
                    partition=partition,
                    admin_addr=f"127.0.0.1:{local_stack.free_port()}",
                    projector_metrics_addr=f"127.0.0.1:{local_stack.free_port()}",
                )
            note = f"projector of partition {partition}" if settings.partitions else ""
            services.append(("projector", own, logs / f"partition{partition}" if partition else logs, note))
        for module, own, log_dir, _ in services:
            started.append(local_stack.start_service(module, own.to_env(), log_dir))
        for module, own, _, _ in services:
            address = _address(module, own)
            serving = functools.partial(_serving_or_dead, address, started)
            local_stack.wait_until(serving, 60, f"gRPC health SERVING on {address}")

        gateway = _start_gateway(settings, logs, started)

        workers = settings.workers or available_cores()
        each = f"{workers} worker processes" if workers > 1 else ""
        for module, own, _, note in services:
            name = SERVICE_NAMES[module]
            notes = "  ".join(f"({n})" for n in (each if module != "projector" else "", note) if n)
            print(f"{name:<15} {_address(module, own)}" + (f"  {notes}" if notes else ""))
        if gateway:
            print(f"{'Gateway':<15} {gateway}  (console; the gRPC contracts over HTTP/JSON, Connect protocol)")
        metrics = [_address(module, own, metrics=True) for module, own, _, _ in services]
        print("metrics         " + "  ".join(f"http://{a}/metrics" for a in metrics))
        written = endpoints.write(data_dir, settings)
        print(f"logs in {(data_dir / 'logs').resolve()}; endpoints in {written.resolve()}", flush=True)
        print("Ctrl-C stops everything", flush=True)
        while not stopping:
            dead = [p for p in started if not p.alive()]
            if dead:
                print(f"{dead[0].name} exited (code {dead[0].proc.returncode}); stopping:\n{dead[0].log_tail()}")
                return 1
            time.sleep(0.5)
        return 0
    except (TimeoutError, RuntimeError, OSError) as exc:
        print(f"orders up failed: {exc}", file=sys.stderr)
        for proc in started:
            print(f"--- {proc.name} log ---\n{proc.log_tail()}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        endpoints.remove(data_dir)
        print("stopping …", flush=True)
        for proc in reversed(started):
            proc.stop()
        for server in reversed(infra):
            server.stop()
        print("stopped")


def _start_gateway(settings: Settings, logs: Path, started: list[local_stack.ManagedProcess]) -> str | None:
    """The HTTP/JSON gateway and console, when its extra (orders-cqrs[gateway]) is installed; its URL."""
    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("connectrpc") is None:
        print("gateway not started: install orders-cqrs[gateway] for the HTTP/JSON API and the console")
        return None
    started.append(local_stack.start_service("orders.gateway", settings.to_env(), logs))
    url = f"http://{settings.gateway_addr}"
    local_stack.wait_until(functools.partial(_http_or_dead, f"{url}/api/health", started), 30, f"gateway on {url}")
    return url + "/"


def _http_or_dead(url: str, processes: Iterable[Any]) -> bool:
    _none_dead(processes)
    return local_stack.http_ok(url)


async def _undrained(settings: Settings) -> dict[str, int]:
    try:
        nc = await jetstream.connect(settings, "orders-up", retry_forever=False)
    except Exception as exc:  # the services report an unreachable NATS themselves, and wait for it
        print(f"orders up: cannot ask NATS for the consumers of earlier runs ({exc})", file=sys.stderr)
        return {}
    try:
        return await jetstream.undrained_consumers(nc, settings)
    finally:
        await jetstream.close(nc)


SERVICE_NAMES = {"command_service": "CommandService", "query_service": "QueryService", "projector": "AdminService"}
ADDRESSES = {  # module → (its gRPC address setting, its metrics address setting)
    "command_service": ("command_addr", "command_metrics_addr"),
    "query_service": ("query_addr", "query_metrics_addr"),
    "projector": ("admin_addr", "projector_metrics_addr"),
}


def _address(module: str, settings: Settings, *, metrics: bool = False) -> str:
    """Where module listens with settings: its gRPC server, or its metrics."""
    return str(getattr(settings, ADDRESSES[module][metrics]))


def _serving_or_dead(address: str, processes: Iterable[Any]) -> bool:
    _none_dead(processes)
    return local_stack.grpc_serving(address)


def _none_dead(processes: Iterable[Any]) -> None:
    for proc in processes:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.log_tail()}")
