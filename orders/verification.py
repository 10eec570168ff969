"""Row-by-row comparison of the read model with the write database (the source of truth), and a
check of the event stream itself.

The read model is correct when, once the projector has caught up, every order and product of the
write database has exactly one read row with the same values and version, and there is no other row.

The stream is correct when every event is in it once: no two messages carry the same event id, or
the same aggregate and version, and each message's Nats-Msg-Id header is its envelope's event id
(the relay's deduplication key). Messages that do not decode are listed, not counted as differences:
the projector dead-letters them, and the read-model comparison shows what they held back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
import psycopg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

from orders.db import libpq_url
from orders.events import HEADER_MSG_ID, SUBJECT_WILDCARD, UndecodableEvent, parse_event

STREAM_FETCH_BATCH = 1000
STREAM_STALL_SECONDS = 30.0  # reading the stream gives up after this long without a message


class StreamUnreadable(RuntimeError):
    """The stream could not be read to its end (no message for STREAM_STALL_SECONDS)."""


_WRITE_ORDERS = """
SELECT o.id::text, o.customer_id, o.status, o.total_minor, o.currency, o.cancel_reason, o.version, o.created_at,
       coalesce(jsonb_agg(jsonb_build_object('sku', i.sku, 'name', i.name, 'quantity', i.quantity,
                                             'unit_price_minor', i.unit_price_minor) ORDER BY i.line_no)
                FILTER (WHERE i.sku IS NOT NULL), '[]'::jsonb)
FROM orders o LEFT JOIN order_items i ON i.order_id = o.id
GROUP BY o.id
"""
_READ_ORDERS = """
SELECT order_id, customer_id, status, total_minor, currency, cancel_reason, version, placed_at, lines
FROM order_summaries
"""
_WRITE_PRODUCTS = "SELECT sku, name, unit_price_minor, currency, stock, version FROM products"
_READ_PRODUCTS = "SELECT sku, name, unit_price_minor, currency, stock, version FROM product_views"
_ORDER_FIELDS = ("customer_id", "status", "total_minor", "currency", "cancel_reason", "version", "placed_at", "lines")
_PRODUCT_FIELDS = ("name", "unit_price_minor", "currency", "stock", "version")


@dataclass
class Report:
    orders_checked: int = 0
    products_checked: int = 0
    differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences


def _compare(
    kind: str,
    fields: tuple[str, ...],
    source: dict[str, tuple[Any, ...]],
    read: dict[str, tuple[Any, ...]],
    report: Report,
) -> None:
    for key in sorted(source.keys() - read.keys()):
        report.differences.append(f"{kind} {key}: missing from the read model")
    for key in sorted(read.keys() - source.keys()):
        report.differences.append(f"{kind} {key}: in the read model but not in the write database")
    for key in sorted(source.keys() & read.keys()):
        for name, want, got in zip(fields, source[key], read[key], strict=True):
            if want != got:
                report.differences.append(
                    f"{kind} {key}: {name} is {got!r} in the read model, {want!r} in the write database"
                )


async def _fetch(url: str, query: str) -> dict[str, tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        cur = await conn.execute(query)
        return {row[0]: tuple(row[1:]) for row in await cur.fetchall()}


async def verify(write_database_url: str, read_database_url: str) -> Report:
    report = Report()
    write_orders = await _fetch(write_database_url, _WRITE_ORDERS)
    read_orders = await _fetch(read_database_url, _READ_ORDERS)
    _compare("order", _ORDER_FIELDS, write_orders, read_orders, report)
    write_products = await _fetch(write_database_url, _WRITE_PRODUCTS)
    read_products = await _fetch(read_database_url, _READ_PRODUCTS)
    _compare("product", _PRODUCT_FIELDS, write_products, read_products, report)
    report.orders_checked = len(write_orders)
    report.products_checked = len(write_products)
    return report


@dataclass
class StreamReport:
    messages: int = 0
    undecodable: list[int] = field(default_factory=list)  # stream sequences of messages that do not decode
    differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences


@dataclass
class _Seen:
    """Where each event id and each (aggregate, version) was first seen: 16-byte ids keep memory small."""

    event_ids: dict[bytes, int] = field(default_factory=dict)
    versions: dict[tuple[str, str, int], int] = field(default_factory=dict)


async def _stream_messages(nc: NATS, stream: str) -> AsyncIterator[Msg]:
    """Every message of the stream up to its last sequence at the start, through an ephemeral consumer
    without acks, in batches (no per-message round trip, whatever the stream's size)."""
    js = nc.jetstream(timeout=10)
    last = (await nc.jsm().stream_info(stream)).state.last_seq or 0
    if not last:
        return
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.NONE,
        filter_subject=SUBJECT_WILDCARD,
        inactive_threshold=60.0,
    )
    sub = await js.pull_subscribe(SUBJECT_WILDCARD, stream=stream, config=config)
    progress_at = time.monotonic()
    try:
        while True:
            try:
                msgs = await sub.fetch(STREAM_FETCH_BATCH, timeout=2.0)
            except (TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                # Nothing yet, or (in a cluster, while leaders move) no consumer leader to answer: try again,
                # for a while.
                if time.monotonic() - progress_at > STREAM_STALL_SECONDS:
                    raise StreamUnreadable(
                        f"no message of stream {stream} for {STREAM_STALL_SECONDS:.0f}s ({type(exc).__name__})"
                    ) from None
                if isinstance(exc, nats.js.errors.ServiceUnavailableError):
                    await asyncio.sleep(0.5)
                continue
            progress_at = time.monotonic()
            for msg in msgs:
                yield msg
                if msg.metadata.sequence.stream >= last or not msg.metadata.num_pending:
                    return
    finally:
        await sub.unsubscribe()


def _id_key(event_id: str) -> bytes:
    try:
        return uuid.UUID(event_id).bytes
    except ValueError:  # not written by the command side; compared as text
        return event_id.encode()


def _check_message(msg: Msg, seen: _Seen, report: StreamReport) -> None:
    seq = msg.metadata.sequence.stream
    report.messages += 1
    try:
        event = parse_event(msg.data or b"")
    except UndecodableEvent:
        report.undecodable.append(seq)
        return
    header = (msg.headers or {}).get(HEADER_MSG_ID)
    if header != event.event_id:
        report.differences.append(f"stream sequence {seq}: {HEADER_MSG_ID} {header!r} is not event id {event.event_id}")
    first = seen.event_ids.setdefault(_id_key(event.event_id), seq)
    if first != seq:
        report.differences.append(f"stream sequence {seq}: event {event.event_id} is also at sequence {first}")
    key = (event.aggregate_type, event.aggregate_id, event.aggregate_version)
    first = seen.versions.setdefault(key, seq)
    if first != seq:
        report.differences.append(
            f"stream sequence {seq}: {key[0]} {key[1]} version {key[2]} is also at sequence {first}"
        )


async def verify_stream(nc: NATS, stream: str) -> StreamReport:
    """Read the whole stream once and report every event that is in it more than once."""
    report, seen = StreamReport(), _Seen()
    async for msg in _stream_messages(nc, stream):
        _check_message(msg, seen, report)
    return report
