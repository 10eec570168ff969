"""The `orders` command: run the services or the local stack, set up schemas, and call every RPC."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import importlib.metadata
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from orders.config import ConfigError, Settings, describe, load, masked, variable

# ---- services and local stack -------------------------------------------------------------------


def _run_module(module: str) -> Callable[[argparse.Namespace, Settings], int]:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        import importlib

        importlib.import_module(f"{module}.__main__").main()
        return 0

    return run


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from orders import migrations

    problem = _unreachable_database(args, settings, server_only=True)
    if problem:
        return _refuse(problem)
    try:
        asyncio.run(migrations.migrate(settings))
    except migrations.Unusable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("schemas of the write and read databases are up to date")
    return 0


def cmd_create_roles(args: argparse.Namespace, settings: Settings) -> int:
    from orders import roles

    problem = _unreachable_database(args, settings)
    if problem:
        return _refuse(problem)
    asyncio.run(roles.apply(settings))
    print(f"roles {roles.COMMAND}, {roles.PROJECTOR} and {roles.QUERY} are in place with their grants")
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """Start PostgreSQL, NATS and the three services; stop everything on Ctrl-C or SIGTERM."""
    from orders import endpoints, local_stack, migrations

    data_dir = Path(args.data_dir or settings.data_dir)
    already = endpoints.running(data_dir)
    if already is not None:
        print(
            f"orders up already runs in {data_dir.resolve()} ({already.describe()}): use it, stop it (Ctrl-C in its "
            "terminal, or kill that pid), or give another --data-dir",
            file=sys.stderr,
        )
        return 1
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
            settings = Settings(
                **{
                    **settings.__dict__,
                    "write_database_url": pg.url("orders_write"),
                    "read_database_url": pg.url("orders_read"),
                    "nats_url": nats.url,
                }
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
        asyncio.run(migrations.migrate(settings))
        env = settings.to_env()
        for module in local_stack.SERVICES:
            started.append(local_stack.start_service(module, env, data_dir / "logs"))
        for address in (settings.command_addr, settings.query_addr, settings.admin_addr):
            serving = functools.partial(_serving_or_dead, address, started)
            local_stack.wait_until(serving, 60, f"gRPC health SERVING on {address}")
        from orders.workers import available_cores

        workers = settings.workers or available_cores()
        each = f"  ({workers} worker processes)" if workers > 1 else ""
        print(f"CommandService  {settings.command_addr}{each}")
        print(f"QueryService    {settings.query_addr}{each}")
        print(f"AdminService    {settings.admin_addr}")
        metrics = (settings.command_metrics_addr, settings.query_metrics_addr, settings.projector_metrics_addr)
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


def _serving_or_dead(address: str, processes: Iterable[Any]) -> bool:
    from orders.local_stack import grpc_serving

    for proc in processes:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.log_tail()}")
    return grpc_serving(address)


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from orders import security

    with security.client_channel(args.address, settings) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout,
                metadata=security.call_metadata(settings),
            )
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as err:
            status = f"no answer ({err.code().name})"
    print(f"{args.address}{' ' + args.service if args.service else ''}: {status}")
    return 0 if status == "SERVING" else 1


def cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    if args.defaults:
        for name, default, doc in describe():
            print(f"{name:34} {default:50} {doc}")
        return 0
    for f in dataclasses.fields(Settings):
        value = masked(f.name, getattr(settings, f.name)) or "(empty)"
        print(f"{variable(f.name):34} {value:50} {args.sources[f.name]}".rstrip())
    return 0


# ---- RPC client ---------------------------------------------------------------------------------


def _output(args: argparse.Namespace, message: Any) -> None:
    from google.protobuf import json_format

    if args.json:
        data = json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        print(json.dumps(data), flush=True)
        return
    if not _print_table(args, message):
        _print_fields(message)


Columns = tuple[tuple[str, int], ...]  # (title, width)
ORDER_COLUMNS: Columns = (("ORDER", 36), ("CUSTOMER", 18), ("STATUS", 9), ("ITEMS", 5), ("TOTAL", 14))
ORDER_COLUMNS += (("PLACED", 19), ("VERSION", 7), ("SEQUENCE", 8))
PRODUCT_COLUMNS: Columns = (("SKU", 20), ("NAME", 30), ("PRICE", 14), ("STOCK", 8), ("VERSION", 7))
DEAD_LETTER_COLUMNS: Columns = (("ID", 6), ("SEQUENCE", 8), ("STATUS", 6), ("AGGREGATE", 46), ("VERSION", 7))
DEAD_LETTER_COLUMNS += (("DELIVERIES", 10), ("CREATED", 19), ("REASON", 0))


def _print_table(args: argparse.Namespace, message: Any) -> bool:
    """Print order summaries, products and dead letters as table rows (the header once per command), and
    each rebuild step as one line; False for other messages."""
    name = message.DESCRIPTOR.name
    if name == "RebuildReadModelResponse":
        if message.swapped:
            print(f"swapped in: the read model now holds all {message.replayed} events replayed", flush=True)
        else:
            print(f"replayed {message.replayed} of {message.target_sequence} events", flush=True)
        return True
    if name in ("ListOrderSummariesResponse", "WatchOrderSummariesResponse"):
        columns, rows = ORDER_COLUMNS, [_order_row(message.summary)]
    elif name == "SearchOrdersResponse":
        columns, rows = ORDER_COLUMNS, [_order_row(summary) for summary in message.summaries]
    elif name == "ListProductsResponse":
        columns, rows = PRODUCT_COLUMNS, [_product_row(product) for product in message.products]
    elif name == "ListDeadLettersResponse":
        columns, rows = DEAD_LETTER_COLUMNS, [_dead_letter_row(letter) for letter in message.dead_letters]
        if not rows:
            print("no dead letters")
            return True
    else:
        return False
    if not getattr(args, "header_printed", False):
        print("  ".join(title.ljust(width) for title, width in columns).rstrip())
        args.header_printed = True
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, (_, width) in zip(row, columns, strict=True)).rstrip(), flush=True)
    if getattr(message, "next_page_token", ""):
        print(f"next page: --page-token {message.next_page_token}")
    return True


def _price(money: Any) -> str:
    return f"{money.minor_units / 100:.2f} {money.currency_code}"


def _when(timestamp: Any) -> str:
    return str(timestamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"))


def _order_row(summary: Any) -> list[str]:
    status = {1: "placed", 2: "cancelled"}.get(summary.status, "?")
    return [
        summary.order_id,
        summary.customer_id,
        status,
        str(summary.item_count),
        _price(summary.total),
        _when(summary.placed_at),
        str(summary.version),
        str(summary.stream_sequence),
    ]


def _product_row(product: Any) -> list[str]:
    return [product.sku, product.name, _price(product.unit_price), str(product.stock), str(product.version)]


def _dead_letter_row(letter: Any) -> list[str]:
    status = {1: "dead", 2: "parked"}.get(letter.status, "?")
    return [
        str(letter.id),
        str(letter.stream_sequence),
        status,
        f"{letter.aggregate_type}/{letter.aggregate_id}",
        str(letter.aggregate_version or "-"),
        str(letter.deliveries),
        _when(letter.created_at),
        letter.reason,
    ]


def _print_fields(message: Any, indent: str = "") -> None:
    """One `name: value` line per field, in the order the proto declares them (whatever their values):
    money as amounts, messages indented below their name, repeated messages as `- ` items, timestamps
    and enums as in JSON; fields that are unset (optional or oneof) and empty bytes are left out."""
    from google.protobuf import json_format
    from google.protobuf.descriptor import FieldDescriptor

    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for field in message.DESCRIPTOR.fields:
        if field.name not in data or (field.type == FieldDescriptor.TYPE_BYTES and not data[field.name]):
            continue
        value, repeated = getattr(message, field.name), field.is_repeated
        nested = field.type == FieldDescriptor.TYPE_MESSAGE and not field.message_type.full_name.startswith(
            "google.protobuf."
        )
        if nested and field.message_type.name == "Money" and not repeated:
            print(f"{indent}{field.name}: {_price(value)}")
        elif nested:
            print(f"{indent}{field.name}:")
            for item in value if repeated else [value]:
                _print_fields(item, indent + ("  - " if repeated else "  "))
        elif field.type == FieldDescriptor.TYPE_BYTES:
            print(f"{indent}{field.name}: {data[field.name]} (base64)")
        else:
            print(f"{indent}{field.name}: {data[field.name]}")
        indent = indent.replace("-", " ")


def _call(args: argparse.Namespace, settings: Settings, service: str, method: str, request: Any) -> int:
    import grpc

    from orders import security
    from orders.v1 import admin_pb2_grpc, commands_pb2_grpc, queries_pb2_grpc

    address, stub_class = {
        "command": (args.command_addr or settings.command_addr, commands_pb2_grpc.CommandServiceStub),
        "query": (args.query_addr or settings.query_addr, queries_pb2_grpc.QueryServiceStub),
        "admin": (args.admin_addr or settings.admin_addr, admin_pb2_grpc.AdminServiceStub),
    }[service]
    with security.client_channel(address, settings) as channel:
        stub = stub_class(channel)
        try:
            reply = getattr(stub, method)(
                request, timeout=None if args.follow else args.timeout, metadata=security.call_metadata(settings)
            )
            if hasattr(reply, "__iter__") and not hasattr(reply, "DESCRIPTOR"):
                for item in reply:
                    _output(args, item)
            else:
                _output(args, reply)
        except grpc.RpcError as err:
            return _print_error(err)
        except KeyboardInterrupt:
            return 130
    return 0


def _print_error(err: Any) -> int:
    from grpc_status import rpc_status

    print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
    status = rpc_status.from_call(err)
    if status is not None:
        from google.rpc import error_details_pb2

        for detail in status.details:
            for kind in (error_details_pb2.BadRequest, error_details_pb2.PreconditionFailure):
                if detail.Is(kind.DESCRIPTOR):
                    message = kind()
                    detail.Unpack(message)
                    for v in getattr(message, "field_violations", []):
                        print(f"  {v.field}: {v.description}", file=sys.stderr)
                    for v in getattr(message, "violations", []):
                        print(f"  {v.type} {v.subject}: {v.description}", file=sys.stderr)
    return 1


def _request_id(args: argparse.Namespace) -> str:
    return args.request_id or str(uuid.uuid4())


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _line(text: str) -> tuple[str, int]:
    sku, sep, quantity = text.rpartition(":")
    if not sep or not quantity.isdigit():
        raise argparse.ArgumentTypeError(f"expected SKU:QUANTITY, got {text!r}")
    return sku, int(quantity)


def cmd_place_order(args: argparse.Namespace, settings: Settings) -> int:
    from orders.v1 import commands_pb2

    request = commands_pb2.PlaceOrderRequest(
        request_id=_request_id(args),
        customer_id=args.customer,
        lines=[commands_pb2.PlaceOrderLine(sku=sku, quantity=qty) for sku, qty in args.line],
    )
    return _call(args, settings, "command", "PlaceOrder", request)


def cmd_cancel_order(args: argparse.Namespace, settings: Settings) -> int:
    from orders.v1 import commands_pb2

    request = commands_pb2.CancelOrderRequest(request_id=_request_id(args), order_id=args.order_id, reason=args.reason)
    if args.expected_version is not None:
        request.expected_version = args.expected_version
    return _call(args, settings, "command", "CancelOrder", request)


def cmd_update_inventory(args: argparse.Namespace, settings: Settings) -> int:
    from orders.v1 import commands_pb2

    request = commands_pb2.UpdateInventoryRequest(request_id=_request_id(args), sku=args.sku)
    if args.delta is not None:
        request.delta = args.delta
    if args.set is not None:
        request.set_level = args.set
    if args.expected_version is not None:
        request.expected_version = args.expected_version
    return _call(args, settings, "command", "UpdateInventory", request)


def cmd_upsert_product(args: argparse.Namespace, settings: Settings) -> int:
    from orders.v1 import commands_pb2, common_pb2

    request = commands_pb2.UpsertProductRequest(
        request_id=_request_id(args),
        sku=args.sku,
        name=args.name,
        unit_price=common_pb2.Money(currency_code=args.currency, minor_units=args.price_minor),
    )
    if args.expected_version is not None:
        request.expected_version = args.expected_version
    return _call(args, settings, "command", "UpsertProduct", request)


def cmd_get_order(args: argparse.Namespace, settings: Settings) -> int:
    from orders.v1 import queries_pb2

    request = queries_pb2.GetOrderSummaryRequest(order_id=args.order_id, consistency_token=args.token)
    return _call(args, settings, "query", "GetOrderSummary", request)


def _filter(args: argparse.Namespace) -> Any:
    from orders.v1 import common_pb2, queries_pb2

    statuses = {"placed": common_pb2.ORDER_STATUS_PLACED, "cancelled": common_pb2.ORDER_STATUS_CANCELLED}
    status = statuses.get(args.status or "", common_pb2.ORDER_STATUS_UNSPECIFIED)
    return queries_pb2.OrderFilter(customer_id=args.customer or "", status=status)


def cmd_list_orders(args: argparse.Namespace, settings: Settings) -> int:
    from orders.v1 import queries_pb2

    request = queries_pb2.ListOrderSummariesRequest(
        filter=_filter(args),
        sort_order=queries_pb2.SORT_ORDER_OLDEST_FIRST if args.oldest_first else queries_pb2.SORT_ORDER_NEWEST_FIRST,
    )
    return _call(args, settings, "query", "ListOrderSummaries", request)


def cmd_search_orders(args: argparse.Namespace, settings: Settings) -> int:
    from orders.v1 import queries_pb2

    request = queries_pb2.SearchOrdersRequest(
        query=args.query, filter=_filter(args), page_size=args.page_size, page_token=args.page_token
    )
    return _call(args, settings, "query", "SearchOrders", request)


def cmd_list_products(args: argparse.Namespace, settings: Settings) -> int:
    from orders.v1 import queries_pb2

    request = queries_pb2.ListProductsRequest(
        page_size=args.page_size, page_token=args.page_token, in_stock_only=args.in_stock, name_prefix=args.prefix
    )
    return _call(args, settings, "query", "ListProducts", request)


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from orders.v1 import queries_pb2

    request = queries_pb2.WatchOrderSummariesRequest(
        order_ids=args.order or [],
        customer_id=args.customer or "",
        include_snapshot=args.snapshot,
        after_sequence=args.after_sequence,
    )
    args.follow = True
    return _call(args, settings, "query", "WatchOrderSummaries", request)


def cmd_seed(args: argparse.Namespace, settings: Settings) -> int:
    """Demo data through the CommandService: products with stock, then orders, with progress lines."""
    import grpc

    try:
        asyncio.run(_seed(args, settings))
    except grpc.RpcError as err:
        return _print_error(err)
    except KeyboardInterrupt:
        return 130
    return 0


async def _seed(args: argparse.Namespace, settings: Settings) -> None:
    import random

    from orders import security
    from orders.v1 import commands_pb2, commands_pb2_grpc, common_pb2

    rng = random.Random(args.random_seed)
    names = ["Anvil", "Bolt", "Cable", "Drill", "Easel", "Funnel", "Gasket", "Hinge", "Ink", "Jack", "Kettle"]
    skus = [f"DEMO-{i:04d}" for i in range(args.products)]
    metadata = security.call_metadata(settings)
    async with security.client_channel(args.command_addr or settings.command_addr, settings, aio=True) as channel:
        stub = commands_pb2_grpc.CommandServiceStub(channel)
        for i, sku in enumerate(skus):
            price = common_pb2.Money(currency_code="EUR", minor_units=rng.randrange(100, 20_000))
            name = f"{names[i % len(names)]} {sku[-4:]}"
            await stub.UpsertProduct(
                commands_pb2.UpsertProductRequest(request_id=str(uuid.uuid4()), sku=sku, name=name, unit_price=price),
                timeout=args.timeout,
                metadata=metadata,
            )
            await stub.UpdateInventory(
                commands_pb2.UpdateInventoryRequest(request_id=str(uuid.uuid4()), sku=sku, delta=args.orders * 3),
                timeout=args.timeout,
                metadata=metadata,
            )
        print(f"{len(skus)} products with stock", flush=True)
        started, done, next_report = time.monotonic(), 0, 0.0
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(args.orders):
            queue.put_nowait(n)

        async def worker() -> None:
            nonlocal done, next_report
            while not queue.empty():
                queue.get_nowait()
                lines = [
                    commands_pb2.PlaceOrderLine(sku=sku, quantity=rng.randint(1, 3))
                    for sku in sorted(rng.sample(skus, k=min(len(skus), rng.randint(1, 4))))
                ]
                await stub.PlaceOrder(
                    commands_pb2.PlaceOrderRequest(
                        request_id=str(uuid.uuid4()), customer_id=f"customer-{rng.randrange(200):03d}", lines=lines
                    ),
                    timeout=args.timeout,
                    metadata=metadata,
                )
                done += 1
                now = time.monotonic()
                if now >= next_report or done == args.orders:
                    next_report = now + 1.0
                    rate = done / max(now - started, 1e-9)
                    print(
                        f"placed {done}/{args.orders} orders ({100 * done // args.orders}%, {rate:.0f}/s)", flush=True
                    )

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))


def cmd_lag(args: argparse.Namespace, settings: Settings) -> int:
    from orders.v1 import admin_pb2

    return _call(args, settings, "admin", "GetProjectionLag", admin_pb2.GetProjectionLagRequest())


def cmd_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    from orders.v1 import admin_pb2

    if args.action == "list":
        return _call(args, settings, "admin", "ListDeadLetters", admin_pb2.ListDeadLettersRequest(page_size=args.limit))
    if not args.ids:
        print("error: give at least one dead letter id", file=sys.stderr)
        return 2
    if args.action == "show":
        return max(
            _call(args, settings, "admin", "GetDeadLetter", admin_pb2.GetDeadLetterRequest(id=i)) for i in args.ids
        )
    if args.action == "replay":
        return _call(args, settings, "admin", "ReplayDeadLetters", admin_pb2.ReplayDeadLettersRequest(ids=args.ids))
    return _call(args, settings, "admin", "DiscardDeadLetters", admin_pb2.DiscardDeadLettersRequest(ids=args.ids))


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from orders.v1 import admin_pb2

    args.follow = True  # a long operation: no deadline; progress lines as it goes
    return _call(args, settings, "admin", "RebuildReadModel", admin_pb2.RebuildReadModelRequest())


EXIT_DIFFERENCES = 1
EXIT_UNREACHABLE = 3
VERIFY_EXIT_STATUS = (
    "exit status: 0 when nothing differs, 1 when differences were found, 2 on a usage or configuration error, "
    "3 when a database or NATS could not be reached (one line on stderr names what was tried)"
)


def _origin(args: argparse.Namespace, field: str) -> str:
    return f"{variable(field)} from {args.sources[field]}"


def _hint(args: argparse.Namespace) -> str:
    """What to try, when no running `orders up` supplied the endpoints."""
    if any(source.startswith("endpoints file") for source in args.sources.values()):
        return ""
    return f"; no `orders up` runs in {args.data_dir or args.settings_data_dir} (see `orders settings`)"


DATABASES = (("write_database_url", "write database"), ("read_database_url", "read database"))


def _unreachable_database(args: argparse.Namespace, settings: Settings, *, server_only: bool = False) -> str | None:
    """None when both databases accept a connection (with server_only, their servers: the databases may
    not exist yet); else one line naming the first that does not, where its URL came from, and why."""
    import psycopg
    from sqlalchemy.engine import make_url

    from orders.db import libpq_url

    for field, what in DATABASES:
        url = getattr(settings, field)
        target = make_url(url).set(database="postgres").render_as_string(hide_password=False) if server_only else url
        try:
            psycopg.connect(libpq_url(target), connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"cannot reach the {what} at {masked(field, url)} ({_origin(args, field)}): {reason}{_hint(args)}"
    return None


def _refuse(problem: str) -> int:
    print(f"error: {problem}", file=sys.stderr)
    return EXIT_UNREACHABLE


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    """Compare the databases directly (works with the projector stopped); with --stream, also read the
    event stream and check that every event is in it once."""
    from projector.verify import verify

    problem = _unreachable_database(args, settings)
    if problem:
        return _refuse(problem)
    report = asyncio.run(verify(settings.write_database_url, settings.read_database_url))
    stream = None
    if args.stream:
        try:
            stream = asyncio.run(_verify_stream(settings))
        except _NatsUnreachable as exc:
            return _refuse(
                f"cannot reach NATS at {masked('nats_url', settings.nats_url)} ({_origin(args, 'nats_url')}): "
                f"{exc}{_hint(args)}"
            )
    differences = report.differences + (stream.differences if stream else [])
    if args.json:
        result: dict[str, Any] = {
            "orders_checked": report.orders_checked,
            "products_checked": report.products_checked,
            "differences": differences,
        }
        if stream:
            result["stream"] = {"messages": stream.messages, "undecodable": stream.undecodable}
        print(json.dumps(result))
    else:
        for line in differences[:100]:
            print(line)
        if stream:
            print(f"stream {settings.stream}: {stream.messages} messages, {len(stream.undecodable)} undecodable")
        print(
            f"checked {report.orders_checked} orders and {report.products_checked} products: "
            f"{len(differences)} differences"
        )
    return 0 if not differences else EXIT_DIFFERENCES


class _NatsUnreachable(Exception):
    """The first connection to NATS failed (the message says how)."""


async def _verify_stream(settings: Settings) -> Any:
    from orders import jetstream
    from projector.verify import StreamUnreadable, verify_stream

    try:
        nc = await jetstream.connect(settings, "orders-verify", retry_forever=False)
    except Exception as exc:  # nats-py raises several unrelated types for an unreachable server
        raise _NatsUnreachable(f"{type(exc).__name__}: {exc}") from None
    try:
        return await verify_stream(nc, settings.stream)
    except StreamUnreadable as exc:
        raise _NatsUnreachable(str(exc)) from None
    finally:
        await jetstream.close(nc)


# ---- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orders", description="CQRS order system: services and client.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('orders-cqrs')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(  # type: ignore[no-untyped-def]
        name: str,
        func: Callable[[argparse.Namespace, Settings], int],
        help_text: str,
        client: bool = False,
        local: bool = True,
        epilog: str | None = None,
    ):
        """A subcommand; client: it calls the gRPC services; local: it finds a stack that `orders up` runs."""
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog)
        p.set_defaults(func=func, follow=False, local=local)
        if local:
            p.add_argument(
                "--data-dir",
                help="data directory of `orders up`, whose running stack this command uses unless ORDERS_* say "
                "otherwise (default ORDERS_DATA_DIR, or .orders-data)",
            )
        if client:
            p.add_argument("--json", action="store_true", help="print JSON (one object per line)")
            p.add_argument("--command-addr", help="CommandService address (default ORDERS_COMMAND_ADDR)")
            p.add_argument("--query-addr", help="QueryService address (default ORDERS_QUERY_ADDR)")
            p.add_argument("--admin-addr", help="AdminService address (default ORDERS_ADMIN_ADDR)")
            p.add_argument("--timeout", type=float, default=10.0, help="call deadline in seconds")
        return p

    p = add("up", cmd_up, "run PostgreSQL, NATS and all services locally (Ctrl-C stops all)", local=False)
    p.add_argument("--data-dir", help="where data and logs live (default ORDERS_DATA_DIR, or .orders-data)")
    p.add_argument(
        "--external",
        action="store_true",
        help="use the PostgreSQL and NATS named by ORDERS_* URLs instead of starting them",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes of the command and query services (default ORDERS_WORKERS; 0: one per core)",
    )
    for name, module, text in (
        ("command-service", "command_service", "run the CommandService (with its outbox relay)"),
        ("query-service", "query_service", "run the QueryService"),
        ("projector", "projector", "run the projector"),
    ):
        add(name, _run_module(module), text, local=False)
    add("migrate", cmd_migrate, "create the databases and tables that are missing")
    add("create-roles", cmd_create_roles, "create one least-privilege PostgreSQL role per service (after migrate)")
    p = add("settings", cmd_settings, "every ORDERS_* variable's value and where it comes from (secrets masked)")
    p.add_argument("--defaults", action="store_true", help="list the defaults and what each variable means instead")
    p = add("health", cmd_health, "exit 0 when the gRPC server at ADDRESS reports SERVING", local=False)
    p.add_argument("address", help="HOST:PORT")
    p.add_argument("--service", default="", help="a service's own status (default: the server's)")
    p.add_argument("--timeout", type=float, default=2.0)

    p = add("place-order", cmd_place_order, "place an order", client=True)
    p.add_argument("--customer", required=True)
    p.add_argument("--line", type=_line, action="append", required=True, metavar="SKU:QTY")
    p.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    p = add("cancel-order", cmd_cancel_order, "cancel an order", client=True)
    p.add_argument("order_id")
    p.add_argument("--reason", default="")
    p.add_argument("--expected-version", type=int)
    p.add_argument("--request-id")
    p = add("update-inventory", cmd_update_inventory, "change a product's stock", client=True)
    p.add_argument("sku")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--delta", type=int, help="add (or with a minus sign remove) units")
    group.add_argument("--set", type=int, help="set the stock to this level")
    p.add_argument("--expected-version", type=int)
    p.add_argument("--request-id")
    p = add("upsert-product", cmd_upsert_product, "create or change a catalog product", client=True)
    p.add_argument("sku")
    p.add_argument("--name", required=True)
    p.add_argument("--price-minor", type=int, required=True, help="unit price in minor units (1999 = 19.99)")
    p.add_argument("--currency", default="EUR")
    p.add_argument("--expected-version", type=int)
    p.add_argument("--request-id")
    p = add("get-order", cmd_get_order, "show one order's summary", client=True)
    p.add_argument("order_id")
    p.add_argument("--token", default="", help="consistency token from a command: wait until it is visible")
    for name, func, text in (
        ("list-orders", cmd_list_orders, "stream order summaries"),
        ("search-orders", cmd_search_orders, "full-text search over orders"),
    ):
        p = add(name, func, text, client=True)
        if name == "search-orders":
            p.add_argument("query")
            p.add_argument("--page-size", type=int, default=0)
            p.add_argument("--page-token", default="")
        else:
            p.add_argument("--oldest-first", action="store_true")
        p.add_argument("--customer")
        p.add_argument("--status", choices=["placed", "cancelled"])
    p = add("list-products", cmd_list_products, "list catalog products", client=True)
    p.add_argument("--in-stock", action="store_true")
    p.add_argument("--prefix", default="", help="name prefix")
    p.add_argument("--page-size", type=int, default=0)
    p.add_argument("--page-token", default="")
    p = add("watch", cmd_watch, "follow changes to orders (Ctrl-C stops)", client=True)
    p.add_argument("--order", action="append", help="order id (repeatable)")
    p.add_argument("--customer")
    p.add_argument("--snapshot", action="store_true", help="first print the current summaries")
    p.add_argument("--after-sequence", type=int, default=0, help="resume after this stream sequence")
    p = add("seed", cmd_seed, "create demo products and orders through the CommandService", client=True)
    p.add_argument("--products", type=_positive, default=50)
    p.add_argument("--orders", type=_positive, default=1000)
    p.add_argument("--concurrency", type=_positive, default=8)
    p.add_argument("--random-seed", type=int, default=1)
    add("lag", cmd_lag, "how far the projection is behind the event stream", client=True)
    p = add("dead-letters", cmd_dead_letters, "list, show, replay or discard dead letters", client=True)
    p.add_argument("action", choices=["list", "show", "replay", "discard"])
    p.add_argument("ids", type=int, nargs="*", help="dead letter ids (show, replay, discard)")
    p.add_argument("--limit", type=int, default=100)
    add("rebuild", cmd_rebuild, "replay the whole stream into fresh read tables and swap them in", client=True)
    p = add(
        "verify",
        cmd_verify,
        "compare the read model with the write database, reading both directly",
        epilog=VERIFY_EXIT_STATUS,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--stream", action="store_true", help="also check that every event is in the stream once (NATS)")
    return parser


def _settings(args: argparse.Namespace) -> tuple[Settings, dict[str, str]]:
    """ORDERS_* from the environment, then (for commands that use a local stack) the endpoints file of the
    `orders up` running in the data directory, then the defaults; and where each value came from."""
    from orders import endpoints

    settings, sources = load()
    if not args.local:
        return settings, sources
    data_dir = Path(args.data_dir or settings.data_dir)
    found = endpoints.running(data_dir)
    if found is None:
        return settings, sources
    return load(fallbacks=[(f"endpoints file {found.path}", found.variables)])


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings, args.sources = _settings(args)
        args.settings_data_dir = settings.data_dir
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        code = args.func(args, settings)
    except BrokenPipeError:
        # Whoever read the output went away (`orders list-products | head`): stop quietly, as Unix tools do,
        # with the status of a process ended by SIGPIPE. stdout now points at /dev/null, so that the
        # interpreter's final flush of what is still buffered cannot fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
