"""How the client commands print replies: tables for lists, `name: value` lines otherwise, JSON on
request, and gRPC errors with their field details."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def output(args: argparse.Namespace, message: Any) -> None:
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
        elif nested and repeated and not value:
            print(f"{indent}{field.name}: (none)")
        elif nested:
            print(f"{indent}{field.name}:")
            for item in value if repeated else [value]:
                _print_fields(item, indent + ("  - " if repeated else "  "))
        elif field.type == FieldDescriptor.TYPE_BYTES:
            print(f"{indent}{field.name}: {data[field.name]} (base64)")
        else:
            print(f"{indent}{field.name}: {data[field.name]}")
        indent = indent.replace("-", " ")


def print_error(err: Any) -> int:
    print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
    status = rpc_status.from_call(err)
    if status is not None:
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
