"""Event conventions: subjects, headers and envelope building/parsing for the ORDERS_EVENTS stream."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from google.protobuf.message import Message

from orders.conversions import timestamp
from orders.v1 import events_pb2

SUBJECT_PREFIX = "orders.v1.events"
SUBJECT_WILDCARD = f"{SUBJECT_PREFIX}.>"
ORDER = "order"
PRODUCT = "product"

HEADER_MSG_ID = "Nats-Msg-Id"  # JetStream deduplication key = event_id
HEADER_EVENT_TYPE = "Orders-Event-Type"
HEADER_CORRELATION_ID = "X-Correlation-Id"
HEADER_TRACEPARENT = "traceparent"


def subject_for(aggregate_type: str, aggregate_id: str) -> str:
    """orders.v1.events.<aggregate_type>.<aggregate_id>. SKUs and UUIDs hold no '.', '*' or '>'."""
    return f"{SUBJECT_PREFIX}.{aggregate_type}.{aggregate_id}"


def stored_subjects(aggregate_type: str, aggregate_id: str) -> tuple[str, str]:
    """The subjects the stream stores an aggregate's events under: as published, and with the partition
    appended (`<subject>.<partition>`, when the stream is partitioned)."""
    subject = subject_for(aggregate_type, aggregate_id)
    return subject, f"{subject}.*"


@dataclass(frozen=True)
class OutgoingEvent:
    """An event ready for the outbox: where it goes, its headers and its serialized envelope."""

    event_id: str
    subject: str
    headers: dict[str, str]
    payload: bytes


@dataclass(frozen=True)
class EventContext:
    """What every event of one command shares: when it happened and which request caused it."""

    occurred_at: datetime
    correlation_id: str
    causation_id: str
    traceparent: str = ""  # W3C trace context of the command, carried in the NATS headers


def build_event(
    context: EventContext, aggregate_type: str, aggregate_id: str, version: int, **payload: Message
) -> OutgoingEvent:
    """Wrap exactly one payload (keyword = the envelope's oneof field name) in an envelope."""
    ((kind, body),) = payload.items()
    envelope = events_pb2.EventEnvelope(
        event_id=str(uuid.uuid4()),
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        aggregate_version=version,
        occurred_at=timestamp(context.occurred_at),
        correlation_id=context.correlation_id,
        causation_id=context.causation_id,
    )
    getattr(envelope, kind).CopyFrom(body)
    headers = {
        HEADER_MSG_ID: envelope.event_id,
        HEADER_EVENT_TYPE: kind,
        HEADER_CORRELATION_ID: context.correlation_id,
    }
    if context.traceparent:
        headers[HEADER_TRACEPARENT] = context.traceparent
    return OutgoingEvent(
        event_id=envelope.event_id,
        subject=subject_for(aggregate_type, aggregate_id),
        headers=headers,
        payload=envelope.SerializeToString(),
    )


class UndecodableEvent(ValueError):
    """The bytes are not a valid event envelope; no retry can fix that."""


def parse_event(data: bytes) -> events_pb2.EventEnvelope:
    """Decode an envelope and check the fields every projection relies on."""
    envelope = events_pb2.EventEnvelope()
    try:
        envelope.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, but also others on garbage
        raise UndecodableEvent(f"not an EventEnvelope: {exc}") from None
    if envelope.WhichOneof("payload") is None:
        raise UndecodableEvent("envelope without a payload (written by a newer version?)")
    if envelope.aggregate_type not in (ORDER, PRODUCT) or not envelope.aggregate_id:
        raise UndecodableEvent(f"unknown aggregate {envelope.aggregate_type!r}/{envelope.aggregate_id!r}")
    if envelope.aggregate_version < 1:
        raise UndecodableEvent(f"invalid aggregate_version {envelope.aggregate_version}")
    return envelope
