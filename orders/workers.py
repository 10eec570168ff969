"""Worker processes: N copies of one service sharing its listening port, under a small supervisor.

With ORDERS_WORKERS above 1, `python -m command_service` (or query_service) does not serve itself: it
starts that many worker processes of the same module, each binding the service's address with
SO_REUSEPORT (the kernel spreads new connections over them), and stays as their supervisor:

- a worker that ends after it served is replaced; one that ends before it ever served (a refused start:
  database not migrated, bad configuration) stops them all and the supervisor exits with its code;
- SIGTERM or SIGINT reaches every worker, which finishes its in-flight calls as a lone service would;
  a worker whose supervisor is gone (SIGKILL) stops by itself within a second;
- the supervisor serves Prometheus metrics at the service's metrics address: every worker's own
  registry (scraped from its loopback port on each request), each sample labelled worker="<index>".

Health, reflection and every RPC are answered by whichever worker the connection landed on, from that
worker's own state. Each worker has its own database pool (ORDERS_DB_POOL_SIZE connections each).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger("orders.workers")

INDEX_ENV = "ORDERS_WORKER_INDEX"  # set in a worker's environment: which one it is (0..N-1)
REPORT_FD_ENV = "ORDERS_WORKER_REPORT_FD"  # the pipe a worker reports on once it serves
PARENT_CHECK_SECONDS = 1.0
STOP_SECONDS = 15.0  # a worker still running this long after SIGTERM is killed
RESTART_DELAY = 1.0  # at most one restart of a worker per second


def available_cores() -> int:
    """The cores this process may run on (a container's CPU set included)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_index() -> int | None:
    """This process's worker index, or None when it is not a supervised worker."""
    value = os.environ.get(INDEX_ENV)
    return int(value) if value is not None else None


def report_serving(metrics_port: int) -> None:
    """In a worker: tell the supervisor that this worker serves, and where its metrics are."""
    fd = os.environ.get(REPORT_FD_ENV)
    if fd is None:
        return
    with contextlib.suppress(OSError), os.fdopen(int(fd), "w") as pipe:
        pipe.write(json.dumps({"pid": os.getpid(), "metrics_port": metrics_port}) + "\n")


def supervisor_gone(parent: int) -> bool:
    """In a worker: True once the supervisor that started it has exited (we were re-parented)."""
    return os.getppid() != parent


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes]
    started: float
    metrics_port: int | None = None  # set once it reported serving
    served: bool = False
    reader: threading.Thread | None = field(default=None, repr=False)


class Supervisor:
    """Starts, watches and stops the workers of one service module."""

    def __init__(self, module: str, count: int, metrics_env: str, metrics_host: str) -> None:
        self.module, self.count = module, count
        self._metrics_env, self._metrics_host = metrics_env, metrics_host
        self.workers: dict[int, Worker] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def _start(self, index: int) -> Worker:
        read_end, write_end = os.pipe()
        env = {
            **os.environ,
            INDEX_ENV: str(index),
            REPORT_FD_ENV: str(write_end),
            self._metrics_env: f"{self._metrics_host}:0",  # each worker's own registry, scraped by us
        }
        try:
            process = subprocess.Popen([sys.executable, "-m", self.module], env=env, pass_fds=(write_end,))
        finally:
            os.close(write_end)
        worker = Worker(index, process, time.monotonic())
        worker.reader = threading.Thread(target=self._read_report, args=(worker, read_end), daemon=True)
        worker.reader.start()
        log.info("worker %d of %s started (pid %d)", index, self.module, process.pid)
        return worker

    def _read_report(self, worker: Worker, fd: int) -> None:
        with os.fdopen(fd) as pipe:
            line = pipe.readline()
        if line:
            report = json.loads(line)
            with self._lock:
                worker.metrics_port, worker.served = int(report["metrics_port"]), True

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (then 0) or a worker that never served ends (then its code)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopping.set())
        self.workers = {i: self._start(i) for i in range(self.count)}
        try:
            while not self._stopping.wait(0.2):
                for index, worker in list(self.workers.items()):
                    code = worker.process.poll()
                    if code is None or self._stopping.is_set():
                        continue
                    if worker.reader is not None:
                        worker.reader.join(1.0)  # a report written just before exiting still counts
                    if not worker.served:
                        log.error("worker %d (pid %d) exited with %s before serving", index, worker.process.pid, code)
                        return code if code > 0 else 1
                    if time.monotonic() - worker.started < RESTART_DELAY:
                        continue  # crashing at once again: wait a little before the next one
                    log.warning("worker %d (pid %d) exited with %s; starting another", index, worker.process.pid, code)
                    self.workers[index] = self._start(index)
            return 0
        finally:
            self._stop_all()

    def _stop_all(self) -> None:
        running = [w.process for w in self.workers.values() if w.process.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in %.0fs; killing it", process.pid, STOP_SECONDS)
                process.kill()
                process.wait()

    def metrics_ports(self) -> dict[int, int]:
        with self._lock:
            return {w.index: w.metrics_port for w in self.workers.values() if w.metrics_port is not None}


class WorkersCollector:
    """Every worker's metrics as one registry: each family once, each sample labelled worker="<index>"."""

    def __init__(self, supervisor: Supervisor, host: str) -> None:
        self._supervisor, self._host = supervisor, host

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for index, port in sorted(self._supervisor.metrics_ports().items()):
            try:
                with urllib.request.urlopen(f"http://{self._host}:{port}/metrics", timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue  # a worker being replaced: its figures are back with its successor
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                merged.samples.extend(
                    Sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp, s.exemplar)
                    for s in family.samples
                )
        yield from families.values()


def supervise(module: str, count: int, metrics_env: str, metrics_addr: str) -> int:
    """Run `count` workers of module and serve their merged metrics at metrics_addr; returns the exit code."""
    host, _, port = metrics_addr.rpartition(":")
    supervisor = Supervisor(module, count, metrics_env, host)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkersCollector(supervisor, host))  # type: ignore[arg-type]
    server: Any
    server, _thread = start_http_server(int(port), host, registry)
    log.info("%s: %d workers sharing one port; merged metrics on port %d", module, count, int(server.server_port))
    try:
        return supervisor.run()
    finally:
        server.shutdown()
