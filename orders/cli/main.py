"""The `orders` command line: its parser, where its settings come from, and the exit status."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from orders import endpoints
from orders.cli.client import (
    cmd_cancel_order,
    cmd_dead_letters,
    cmd_get_order,
    cmd_lag,
    cmd_list_orders,
    cmd_list_products,
    cmd_place_order,
    cmd_rebuild,
    cmd_search_orders,
    cmd_update_inventory,
    cmd_upsert_product,
    cmd_watch,
    line,
    positive,
)
from orders.cli.seed import cmd_seed
from orders.cli.services import cmd_create_roles, cmd_health, cmd_migrate, cmd_settings, run_module
from orders.cli.up import cmd_up
from orders.cli.verify import VERIFY_EXIT_STATUS, cmd_verify
from orders.config import ConfigError, Settings, load


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
    p.add_argument(
        "--read-replicas",
        type=int,
        default=0,
        choices=range(0, 10),
        metavar="N",
        help="streaming replicas of the read database, each with a query service of its own (0 to 9; default 0)",
    )
    p.add_argument(
        "--projectors",
        type=int,
        default=1,
        choices=range(1, 17),
        metavar="N",
        help="projector processes; more than 1 partitions the event stream, one partition each (1 to 16; "
        "default 1; keep the number from run to run, or see the README on changing it)",
    )
    for name, module, text in (
        ("command-service", "command_service", "run the CommandService (with its outbox relay)"),
        ("query-service", "query_service", "run the QueryService"),
        ("projector", "projector", "run the projector"),
        ("gateway", "orders.gateway", "run the HTTP/JSON gateway (Connect protocol) and the operator console"),
    ):
        add(name, run_module(module), text, local=False)
    add("migrate", cmd_migrate, "create the databases and tables that are missing")
    add("create-roles", cmd_create_roles, "create one least-privilege PostgreSQL role per service (after migrate)")
    p = add("settings", cmd_settings, "every ORDERS_* variable's value and where it comes from (secrets masked)")
    p.add_argument("--defaults", action="store_true", help="list the defaults and what each variable means instead")
    p = add(
        "health",
        cmd_health,
        "exit 0 when the gRPC server at ADDRESS reports SERVING (or an http:// URL, the gateway's, answers 200)",
        local=False,
    )
    p.add_argument("address", help="HOST:PORT, or http://HOST:PORT/api/health for the gateway")
    p.add_argument("--service", default="", help="a service's own status (default: the server's)")
    p.add_argument("--timeout", type=float, default=2.0)

    p = add("place-order", cmd_place_order, "place an order", client=True)
    p.add_argument("--customer", required=True)
    p.add_argument("--line", type=line, action="append", required=True, metavar="SKU:QTY")
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
    p.add_argument("--products", type=positive, default=50)
    p.add_argument("--orders", type=positive, default=1000)
    p.add_argument("--concurrency", type=positive, default=8)
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


def load_settings(args: argparse.Namespace) -> tuple[Settings, dict[str, str]]:
    """ORDERS_* from the environment, then (for commands that use a local stack) the endpoints file of the
    `orders up` running in the data directory, then the defaults; and where each value came from."""
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
        settings, args.sources = load_settings(args)
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
