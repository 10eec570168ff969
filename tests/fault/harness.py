"""What every fault scenario shares: a system of its own, a retrying client that keeps a ledger of
every logical command, load threads, and the checks run after each fault.

The checks, after every scenario:
- `orders verify --stream --json`, run as the real CLI with the scenario's settings: the read model
  equals the write model, and every event is in the stream once;
- the ledger: each PlaceOrder answered OK exists in the write and read databases with its lines and
  the right status, each CancelOrder answered OK shows CANCELLED, no other order exists (a command
  applied twice would create one), and each product's stock is its initial level minus what the
  live orders of the ledger reserve (an order applied twice would reserve twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import psycopg

from command_service.outbox import backlog_of
from orders import jetstream, local_stack, security
from orders.config import Settings
from orders.db import libpq_url
from orders.v1 import commands_pb2, commands_pb2_grpc
from tests.support import add_product, eventually, migrate, start_serving, verify_cli

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
CALL_DEADLINE = 10.0  # seconds, every command call
GIVE_UP_AFTER = 120.0  # a logical command still failing after this long is reported as unresolved
INITIAL_STOCK = 1_000_000
# Reconnect quickly to a restarted server (gRPC's default backoff grows to minutes).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


# ---- the ledger ---------------------------------------------------------------------------------


@dataclass
class Attempt:
    code: str  # "OK" or the gRPC status name
    seconds: float  # how long the call took


@dataclass
class Command:
    """One logical command: one request_id, however many attempts it took."""

    kind: str  # "place" or "cancel"
    request_id: str
    customer: str = ""
    lines: tuple[tuple[str, int], ...] = ()
    order_id: str = ""  # place: from the response; cancel: the target
    consistency_token: str = ""  # from the OK response
    attempts: list[Attempt] = field(default_factory=list)
    outcome: str = ""  # final code: OK, a business rejection, or UNRESOLVED

    @property
    def ok(self) -> bool:
        return self.outcome == "OK"

    @property
    def retried(self) -> bool:
        return len(self.attempts) > 1


BUSINESS_REJECTIONS = {("place", "FAILED_PRECONDITION")}  # out of stock is an answer, not a loss


class Client:
    """Commands with a deadline on every call, retried with the same request_id on UNAVAILABLE or
    DEADLINE_EXCEEDED (spread over the given servers), and recorded in a shared ledger."""

    def __init__(
        self,
        addresses: list[str],
        metadata: tuple[tuple[str, str], ...] = (),
        retryable: tuple[grpc.StatusCode, ...] = RETRYABLE,
        credentials: grpc.ChannelCredentials | None = None,  # TLS; plaintext without
    ) -> None:
        self.metadata = metadata  # e.g. the bearer token, when the system requires one
        self.retryable = retryable
        self.channels = [
            grpc.secure_channel(a, credentials, options=CHANNEL_OPTIONS)
            if credentials
            else grpc.insecure_channel(a, options=CHANNEL_OPTIONS)
            for a in addresses
        ]
        self.stubs = [commands_pb2_grpc.CommandServiceStub(c) for c in self.channels]
        self.ledger: list[Command] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def place(self, customer: str, lines: list[tuple[str, int]], server: int = 0) -> Command:
        command = Command("place", str(uuid.uuid4()), customer, tuple(lines))
        request = commands_pb2.PlaceOrderRequest(
            request_id=command.request_id,
            customer_id=customer,
            lines=[commands_pb2.PlaceOrderLine(sku=s, quantity=q) for s, q in lines],
        )
        reply = self._run(command, "PlaceOrder", request, server)
        if reply is not None:
            command.order_id, command.consistency_token = reply.order_id, reply.consistency_token
        return command

    def cancel(self, order_id: str, server: int = 0) -> Command:
        command = Command("cancel", str(uuid.uuid4()), order_id=order_id)
        request = commands_pb2.CancelOrderRequest(request_id=command.request_id, order_id=order_id, reason="fault test")
        self._run(command, "CancelOrder", request, server)
        return command

    def _run(self, command: Command, method: str, request: Any, server: int) -> Any:
        with self._lock:
            self.ledger.append(command)
        started = time.monotonic()
        for attempt in itertools.count():
            stub = self.stubs[(server + attempt) % len(self.stubs)]
            sent = time.monotonic()
            try:
                reply = getattr(stub, method)(request, timeout=CALL_DEADLINE, metadata=self.metadata)
            except grpc.RpcError as exc:
                code = exc.code()
                command.attempts.append(Attempt(code.name, time.monotonic() - sent))
                if code not in self.retryable:
                    command.outcome = code.name
                    return None
                if time.monotonic() - started > GIVE_UP_AFTER:
                    command.outcome = "UNRESOLVED"
                    return None
                time.sleep(min(0.05 * 2**attempt, 1.0))  # client back-off between attempts
                continue
            command.attempts.append(Attempt("OK", time.monotonic() - sent))
            command.outcome = "OK"
            return reply
        raise AssertionError("unreachable")

    def unexpected(self) -> list[Command]:
        """Commands that ended neither OK nor with an accepted business rejection."""
        return [c for c in self.ledger if not c.ok and (c.kind, c.outcome) not in BUSINESS_REJECTIONS]

    def failed_attempts(self) -> list[Attempt]:
        return [a for c in self.ledger for a in c.attempts if a.code != "OK"]


# ---- load ---------------------------------------------------------------------------------------


class Load:
    """Worker threads sending PlaceOrder (70%) and CancelOrder (30%, each worker cancels only orders
    it placed, once) until `total` commands were started or stop() is called, as fast as they are
    answered or, with `rate`, that many commands per second per worker. A command already started is
    retried to its end even after stop()."""

    def __init__(
        self,
        client: Client,
        skus: list[str],
        customers: list[str],
        *,
        total: int | None = None,
        workers: int = 4,
        seed: int = 1,
        rate: float | None = None,
    ) -> None:
        self.client, self.skus, self.customers, self.total = client, skus, customers, total
        self.interval = 1.0 / rate if rate else 0.0  # seconds between the starts of one worker's commands
        self._started = itertools.count()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(seed + i, i), daemon=True) for i in range(workers)]
        self.errors: list[BaseException] = []

    def _work(self, seed: int, index: int) -> None:
        rng = random.Random(seed)
        placed: list[str] = []
        next_start = time.monotonic()
        try:
            while not self._stop.is_set() and (self.total is None or next(self._started) < self.total):
                if self.interval:  # a paced load: the next command starts on schedule (or at once, if late)
                    next_start += self.interval
                    self._stop.wait(max(0.0, next_start - time.monotonic()))
                server = index + len(placed)
                if placed and rng.random() < 0.3:
                    self.client.cancel(placed.pop(rng.randrange(len(placed))), server)
                    continue
                lines = [(s, rng.randint(1, 3)) for s in sorted(rng.sample(self.skus, rng.randint(1, 3)))]
                command = self.client.place(rng.choice(self.customers), lines, server)
                if command.ok:
                    placed.append(command.order_id)
        except BaseException as exc:  # surfaced by join()
            self.errors.append(exc)

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "load threads did not finish"
        assert not self.errors, self.errors

    def count(self) -> int:
        return len(self.client.ledger)

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        """Run the load during the with block. At its end, wait for the load to finish: all `total`
        commands when a total is set, otherwise stop it and wait for the commands already started."""
        self.start()
        try:
            yield self
        except BaseException:
            self.stop()
            raise
        finally:
            if self.total is None:
                self.stop()
            self.join()


def wait_for_commands(load: Load, more: int, timeout: float = 60) -> None:
    """Block until the load has sent `more` further commands (so a fault strikes mid-load)."""
    wait_for_count(load, load.count() + more, timeout)


def wait_for_count(load: Load, count: int, timeout: float = 60) -> None:
    """Block until the load has sent `count` commands in all."""
    eventually(lambda: load.count() >= count, timeout, f"{count} commands sent")


# ---- a system of the scenario's own -------------------------------------------------------------


class System:
    """One scenario's processes (by name), settings and client; every process is stopped by pid at close."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.processes: dict[str, local_stack.ManagedProcess] = {}
        self.process_settings: dict[str, Settings] = {}
        self.skus: list[str] = []

    def start(self, name: str, module: str, settings: Settings | None = None) -> local_stack.ManagedProcess:
        """Start (or restart) the process called name and wait until it serves."""
        chosen = settings or self.process_settings.get(name) or self.settings
        self.process_settings[name] = chosen
        self.processes[name] = start_serving(module, chosen, self.log_dir / name, timeout=90)
        return self.processes[name]

    def adopt(self, name: str, proc: local_stack.ManagedProcess) -> None:
        """Track a process started elsewhere (a restarted server), so that close() stops it."""
        self.processes[name] = proc

    def kill(self, name: str) -> None:
        self.processes[name].kill()

    def restart_killed(self, name: str) -> local_stack.ManagedProcess:
        self.kill(name)
        return self.start(name, self.processes[name].name)

    def close(self) -> None:
        for proc in self.processes.values():
            proc.stop()

    def seed_catalog(self, client: Client, products: int = 20) -> list[str]:
        """Products with INITIAL_STOCK each, created through the command service."""
        self.skus = [f"F{i:02d}-{uuid.uuid4().hex[:6]}" for i in range(products)]
        for sku in self.skus:
            add_product(client.stubs[0], sku, stock=INITIAL_STOCK, metadata=client.metadata)
        return self.skus


def with_addresses(settings: Settings) -> Settings:
    """The same system's settings with fresh listen addresses (a second replica of a service)."""
    return replace(settings, **local_stack.free_addresses())


@contextlib.contextmanager
def system(settings: Settings, log_dir: Path) -> Iterator[System]:
    asyncio.run(migrate(settings))
    running = System(settings, log_dir)
    try:
        yield running
    finally:
        running.close()


@contextlib.contextmanager
def loaded_system(
    settings: Settings, log_dir: Path, customers: str, *, adopt: dict[str, Any] | None = None, **load_options: Any
) -> Iterator[tuple[System, Client, Load]]:
    """The usual scenario: a system of its own with one command service and one projector on settings
    (after adopting the given processes, so that they are stopped with it), a seeded catalog, and a
    load over 50 customers named <customers><n>, not started yet. With authentication on, the client
    sends settings.client_token."""
    client = Client([settings.command_addr], security.call_metadata(settings))
    with system(settings, log_dir) as running, contextlib.closing(client):
        for name, proc in (adopt or {}).items():
            running.adopt(name, proc)
        running.start("command", "command_service")
        running.start("projector", "projector")
        skus = running.seed_catalog(client)
        yield running, client, Load(client, skus, [f"{customers}{i}" for i in range(50)], **load_options)


# ---- checks -------------------------------------------------------------------------------------


def wait_verified(settings: Settings, timeout: float = 120) -> dict[str, Any]:
    """Run verify until it is green; return its report."""
    reports: list[dict[str, Any]] = []

    def green() -> bool:
        code, report = verify_cli(settings)
        reports.append(report)
        return code == 0

    try:
        local_stack.wait_until(green, timeout, "orders verify green", interval=0.5)
    except TimeoutError:
        raise AssertionError(f"verify never green; last report: {reports[-1] if reports else None}") from None
    return reports[-1]


def _versions(url: str, query: str) -> dict[str, int]:
    with psycopg.connect(libpq_url(url)) as conn:
        return {row[0]: row[1] for row in conn.execute(query)}


def caught_up_after(settings: Settings, since: float, timeout: float = 120) -> float:
    """Seconds from `since` (a fault's end) until the read model reflects every product change
    committed when this is called (every PlaceOrder and CancelOrder changes products): the backlog
    left by the fault has drained, even while load goes on."""
    target = _versions(settings.write_database_url, "SELECT sku, version FROM products")

    def reached() -> bool:
        seen = _versions(settings.read_database_url, "SELECT sku, version FROM product_views")
        return all(seen.get(sku, 0) >= version for sku, version in target.items())

    eventually(reached, timeout, "the read model catching up")
    return time.monotonic() - since


@dataclass
class DbOrder:
    customer: str
    status: str
    lines: tuple[tuple[str, int], ...]


def _write_orders(settings: Settings) -> dict[str, DbOrder]:
    with psycopg.connect(libpq_url(settings.write_database_url)) as conn:
        items: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for order_id, sku, quantity in conn.execute("SELECT order_id::text, sku, quantity FROM order_items"):
            items[order_id].append((sku, quantity))
        rows = conn.execute("SELECT id::text, customer_id, status FROM orders").fetchall()
    return {o: DbOrder(c, s, tuple(sorted(items[o]))) for o, c, s in rows}


def _read_orders(settings: Settings) -> dict[str, DbOrder]:
    with psycopg.connect(libpq_url(settings.read_database_url)) as conn:
        rows = conn.execute("SELECT order_id, customer_id, status, lines FROM order_summaries").fetchall()
    return {
        o: DbOrder(c, s, tuple(sorted((line["sku"], line["quantity"]) for line in lines))) for o, c, s, lines in rows
    }


def _stocks(url: str, table: str) -> dict[str, int]:
    with psycopg.connect(libpq_url(url)) as conn:
        return {row[0]: row[1] for row in conn.execute(f"SELECT sku, stock FROM {table}")}


def expected_orders(ledger: list[Command]) -> dict[str, DbOrder]:
    """What the ledger says must exist: every order placed OK, CANCELLED when a cancel of it was OK."""
    cancelled = {c.order_id for c in ledger if c.kind == "cancel" and c.ok}
    return {
        c.order_id: DbOrder(c.customer, "CANCELLED" if c.order_id in cancelled else "PLACED", tuple(sorted(c.lines)))
        for c in ledger
        if c.kind == "place" and c.ok
    }


def expected_stock(ledger: list[Command], skus: list[str]) -> dict[str, int]:
    """Initial stock of skus minus what the ledger's live (not cancelled) orders reserve of them (other
    products' orders may share the ledger)."""
    stock = dict.fromkeys(skus, INITIAL_STOCK)
    for order in expected_orders(ledger).values():
        if order.status == "PLACED":
            for sku, quantity in order.lines:
                if sku in stock:
                    stock[sku] -= quantity
    return stock


@dataclass
class LedgerCheck:
    lost: list[str]  # OK commands not (or not rightly) reflected
    duplicated: list[str]  # effects no command, or more than one, explains


def check_ledger(settings: Settings, ledger: list[Command], skus: list[str]) -> LedgerCheck:
    want = expected_orders(ledger)
    lost, duplicated = [], []
    for side, found in (("write", _write_orders(settings)), ("read", _read_orders(settings))):
        lost += [f"{side}: order {o} is {found.get(o)}, expected {w}" for o, w in want.items() if found.get(o) != w]
        duplicated += [f"{side}: order {o} was never placed OK by the client" for o in found.keys() - want.keys()]
    stock = expected_stock(ledger, skus)
    for side, table, url in (
        ("write", "products", settings.write_database_url),
        ("read", "product_views", settings.read_database_url),
    ):
        found_stock = _stocks(url, table)
        duplicated += [
            f"{side}: {sku} stock {found_stock.get(sku)}, expected {level}"
            for sku, level in stock.items()
            if found_stock.get(sku) != level
        ]
    return LedgerCheck(lost, duplicated)


# ---- the summary table --------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    commands: int
    ok: int
    rejected: int
    retried: int
    failed_attempts: int
    lost: int
    duplicated: int
    caught_up_seconds: float
    seconds: float


ROWS: list[Row] = []


def summarize(scenario: str, client: Client, check: LedgerCheck, caught_up: float, started: float) -> Row:
    ledger = client.ledger
    row = Row(
        scenario=scenario,
        commands=len(ledger),
        ok=sum(c.ok for c in ledger),
        rejected=sum(not c.ok for c in ledger),
        retried=sum(c.retried for c in ledger),
        failed_attempts=len(client.failed_attempts()),
        lost=len(check.lost),
        duplicated=len(check.duplicated),
        caught_up_seconds=caught_up,
        seconds=time.monotonic() - started,
    )
    ROWS.append(row)
    return row


def finish(scenario: str, system: System, client: Client, caught_up: float, started: float) -> dict[str, Any]:
    """The checks every scenario ends with: verify green, ledger exact, nothing unexpected; one summary row."""
    report = wait_verified(system.settings)
    check = check_ledger(system.settings, client.ledger, system.skus)
    summarize(scenario, client, check, caught_up, started)
    assert client.unexpected() == [], [(c.kind, c.outcome, c.attempts) for c in client.unexpected()][:5]
    assert check.lost == [], check.lost[:10]
    assert check.duplicated == [], check.duplicated[:10]
    return report


def summary_lines() -> list[str]:
    columns = ["scenario", "commands", "OK", "rejected", "retried", "failed attempts", "lost", "duplicated"]
    columns += ["caught up (s)", "total (s)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in ROWS:
        lines.append(
            f"| {r.scenario} | {r.commands} | {r.ok} | {r.rejected} | {r.retried} | {r.failed_attempts} | {r.lost} | "
            f"{r.duplicated} | {r.caught_up_seconds:.1f} | {r.seconds:.0f} |"
        )
    return lines


def outbox_backlog(settings: Settings) -> int:
    """Outbox rows the relay has not published yet."""
    return asyncio.run(backlog_of(settings))


def fetch(url: str) -> str:
    """The body of an HTTP GET (a metrics page)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def metric(url: str, sample: str) -> float:
    """One sample's value from a metrics page (name with its labels, as exposed); 0 when absent."""
    for line in fetch(url).splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


def health(address: str, service: str = "") -> str | None:
    return local_stack.grpc_health(address, service, timeout=2.0)


# ---- JetStream ----------------------------------------------------------------------------------


def consumer_info(settings: Settings) -> Any:
    async def ask() -> Any:
        nc = await jetstream.connect(settings, "fault-test", retry_forever=False)
        try:
            return await nc.jsm().consumer_info(settings.stream, settings.consumer)
        finally:
            await jetstream.close(nc)

    return asyncio.run(ask())


def stream_info(settings: Settings) -> Any:
    async def ask() -> Any:
        nc = await jetstream.connect(settings, "fault-test", retry_forever=False)
        try:
            return await nc.jsm().stream_info(settings.stream)
        finally:
            await jetstream.close(nc)

    return asyncio.run(ask())
