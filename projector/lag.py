"""How far the projection is behind the stream, in events and in seconds."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from orders import jetstream
from orders.config import Settings
from orders.events import parse_event
from orders.outbox_report import OutboxReport


@dataclass(frozen=True)
class Lag:
    stream_last_seq: int
    ack_floor_seq: int
    ack_pending: int
    events: int  # events not yet applied: unpublished in the outbox + (stream last sequence - ack floor)
    seconds: float  # age of the oldest event not yet applied, in the outbox or the stream; 0 when caught up
    unpublished: int = 0  # of events, those still in the outbox (as the relay last reported)
    unpublished_seconds: float = 0.0  # age of the oldest of them


async def measure(nc: NATS, settings: Settings, outbox: OutboxReport | None = None) -> Lag:
    """Ask JetStream how far settings' projector's consumer is behind; add what the relay's last fresh
    report says still waits in the outbox (the projector cannot see the write database).

    Without partitions, the events behind are the stream's last sequence - the consumer's ack floor.
    A partition's consumer sees its partition's events only: those it has not delivered yet plus those
    delivered and not yet acknowledged."""
    jsm = nc.jsm()
    stream = await jsm.stream_info(settings.stream)
    consumer = await jsm.consumer_info(settings.stream, jetstream.consumer_name(settings))
    last = stream.state.last_seq or 0
    floor = (consumer.ack_floor.stream_seq if consumer.ack_floor else 0) or 0
    if settings.partitions:
        behind = (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
    else:
        behind = max(0, last - floor)
    seconds = 0.0
    if behind:
        try:
            oldest = await jsm.get_msg(
                settings.stream, floor + 1, subject=jetstream.consumer_subjects(settings), next=True
            )
            occurred = parse_event(oldest.data or b"").occurred_at.ToNanoseconds() / 1e9
            seconds = max(0.0, time.time() - occurred)
        except Exception:  # deleted, or undecodable: the count alone must do
            seconds = 0.0
    waiting, waited = (outbox.backlog, outbox.oldest_seconds) if outbox is not None and outbox.fresh() else (0, 0.0)
    return Lag(last, floor, consumer.num_ack_pending or 0, behind + waiting, max(seconds, waited), waiting, waited)


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    consumer: str
    lag: Lag | None  # None: the partition has no consumer yet (its projector never ran)


async def measure_partitions(nc: NATS, settings: Settings) -> list[PartitionLag]:
    """Each partition's lag (outbox not included), for the partitioning settings name; [] without one."""
    measured = []
    for partition in range(settings.partitions):
        own = dataclasses.replace(settings, partition=partition)
        try:
            found: Lag | None = await measure(nc, own)
        except NotFoundError:
            found = None
        measured.append(PartitionLag(partition, jetstream.consumer_name(own), found))
    return measured


async def record(conn: psycopg.AsyncConnection[Any], projection: str, lag: Lag) -> None:
    """Store the measurement where the query service reads it for its health status."""
    await conn.execute(
        "INSERT INTO projection_checkpoints (projection, last_stream_seq, updated_at, lag_events, lag_seconds,"
        " lag_measured_at, outbox_backlog, outbox_oldest_seconds) VALUES (%s, 0, now(), %s, %s, now(), %s, %s)"
        " ON CONFLICT (projection) DO UPDATE SET lag_events = EXCLUDED.lag_events, lag_seconds = EXCLUDED.lag_seconds,"
        " lag_measured_at = now(), outbox_backlog = EXCLUDED.outbox_backlog,"
        " outbox_oldest_seconds = EXCLUDED.outbox_oldest_seconds",
        (projection, lag.events, lag.seconds, lag.unpublished, lag.unpublished_seconds),
    )
