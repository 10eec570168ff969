"""Client commands: one RPC each, its request built from the arguments, its reply printed."""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any

import grpc

from orders import security
from orders.cli.printing import output, print_error
from orders.config import Settings
from orders.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    commands_pb2,
    commands_pb2_grpc,
    common_pb2,
    queries_pb2,
    queries_pb2_grpc,
)


def call(args: argparse.Namespace, settings: Settings, service: str, method: str, request: Any) -> int:
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
                    output(args, item)
            else:
                output(args, reply)
        except grpc.RpcError as err:
            return print_error(err)
        except KeyboardInterrupt:
            return 130
    return 0


def _request_id(args: argparse.Namespace) -> str:
    return args.request_id or str(uuid.uuid4())


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def line(text: str) -> tuple[str, int]:
    sku, sep, quantity = text.rpartition(":")
    if not sep or not quantity.isdigit():
        raise argparse.ArgumentTypeError(f"expected SKU:QUANTITY, got {text!r}")
    return sku, int(quantity)


def cmd_place_order(args: argparse.Namespace, settings: Settings) -> int:
    request = commands_pb2.PlaceOrderRequest(
        request_id=_request_id(args),
        customer_id=args.customer,
        lines=[commands_pb2.PlaceOrderLine(sku=sku, quantity=qty) for sku, qty in args.line],
    )
    return call(args, settings, "command", "PlaceOrder", request)


def cmd_cancel_order(args: argparse.Namespace, settings: Settings) -> int:
    request = commands_pb2.CancelOrderRequest(request_id=_request_id(args), order_id=args.order_id, reason=args.reason)
    if args.expected_version is not None:
        request.expected_version = args.expected_version
    return call(args, settings, "command", "CancelOrder", request)


def cmd_update_inventory(args: argparse.Namespace, settings: Settings) -> int:
    request = commands_pb2.UpdateInventoryRequest(request_id=_request_id(args), sku=args.sku)
    if args.delta is not None:
        request.delta = args.delta
    if args.set is not None:
        request.set_level = args.set
    if args.expected_version is not None:
        request.expected_version = args.expected_version
    return call(args, settings, "command", "UpdateInventory", request)


def cmd_upsert_product(args: argparse.Namespace, settings: Settings) -> int:
    request = commands_pb2.UpsertProductRequest(
        request_id=_request_id(args),
        sku=args.sku,
        name=args.name,
        unit_price=common_pb2.Money(currency_code=args.currency, minor_units=args.price_minor),
    )
    if args.expected_version is not None:
        request.expected_version = args.expected_version
    return call(args, settings, "command", "UpsertProduct", request)


def cmd_get_order(args: argparse.Namespace, settings: Settings) -> int:
    request = queries_pb2.GetOrderSummaryRequest(order_id=args.order_id, consistency_token=args.token)
    return call(args, settings, "query", "GetOrderSummary", request)


def _filter(args: argparse.Namespace) -> Any:
    statuses = {"placed": common_pb2.ORDER_STATUS_PLACED, "cancelled": common_pb2.ORDER_STATUS_CANCELLED}
    status = statuses.get(args.status or "", common_pb2.ORDER_STATUS_UNSPECIFIED)
    return queries_pb2.OrderFilter(customer_id=args.customer or "", status=status)


def cmd_list_orders(args: argparse.Namespace, settings: Settings) -> int:
    request = queries_pb2.ListOrderSummariesRequest(
        filter=_filter(args),
        sort_order=queries_pb2.SORT_ORDER_OLDEST_FIRST if args.oldest_first else queries_pb2.SORT_ORDER_NEWEST_FIRST,
    )
    return call(args, settings, "query", "ListOrderSummaries", request)


def cmd_search_orders(args: argparse.Namespace, settings: Settings) -> int:
    request = queries_pb2.SearchOrdersRequest(
        query=args.query, filter=_filter(args), page_size=args.page_size, page_token=args.page_token
    )
    return call(args, settings, "query", "SearchOrders", request)


def cmd_list_products(args: argparse.Namespace, settings: Settings) -> int:
    request = queries_pb2.ListProductsRequest(
        page_size=args.page_size, page_token=args.page_token, in_stock_only=args.in_stock, name_prefix=args.prefix
    )
    return call(args, settings, "query", "ListProducts", request)


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    request = queries_pb2.WatchOrderSummariesRequest(
        order_ids=args.order or [],
        customer_id=args.customer or "",
        include_snapshot=args.snapshot,
        after_sequence=args.after_sequence,
    )
    args.follow = True
    return call(args, settings, "query", "WatchOrderSummaries", request)


def cmd_lag(args: argparse.Namespace, settings: Settings) -> int:
    return call(args, settings, "admin", "GetProjectionLag", admin_pb2.GetProjectionLagRequest())


def cmd_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "list":
        return call(args, settings, "admin", "ListDeadLetters", admin_pb2.ListDeadLettersRequest(page_size=args.limit))
    if not args.ids:
        print("error: give at least one dead letter id", file=sys.stderr)
        return 2
    if args.action == "show":
        return max(
            call(args, settings, "admin", "GetDeadLetter", admin_pb2.GetDeadLetterRequest(id=i)) for i in args.ids
        )
    if args.action == "replay":
        return call(args, settings, "admin", "ReplayDeadLetters", admin_pb2.ReplayDeadLettersRequest(ids=args.ids))
    return call(args, settings, "admin", "DiscardDeadLetters", admin_pb2.DiscardDeadLettersRequest(ids=args.ids))


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    args.follow = True  # a long operation: no deadline; progress lines as it goes
    return call(args, settings, "admin", "RebuildReadModel", admin_pb2.RebuildReadModelRequest())
