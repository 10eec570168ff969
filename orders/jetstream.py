"""NATS JetStream plumbing: connecting, creating or updating the stream and the consumer, atomic batches."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.errors import NotFoundError

from orders.backoff import Backoff
from orders.config import Settings
from orders.events import SUBJECT_PREFIX, SUBJECT_WILDCARD

log = logging.getLogger(__name__)

# JetStream API error codes (nats-server's errors.json) of atomic batch publishes, and one of ours
ATOMIC_PUBLISH_DISABLED = 10174  # the stream does not allow atomic publishes
ATOMIC_BATCH_HAS_DUPLICATE = 10201  # a message id of the batch is already in the stream: nothing stored
NOT_A_BATCH = -1  # the server answered the commit as a plain publish (no atomic batches before 2.12)
ATOMIC_BATCH_MAX = 1000  # nats-server's default ceiling of messages per atomic batch


async def connect(
    target: Settings | str,
    name: str,
    *,
    retry_forever: bool = True,
    on_reconnect: Callable[[], None] | None = None,
) -> NATS:
    """Connect to NATS (target: the settings, with their credentials, or a bare URL), reconnecting for ever.

    With retry_forever the first connection is retried too, so a service can start before NATS. The
    client PINGs its server every nats_ping_interval seconds and replaces a connection once more than
    nats_max_outstanding_pings PINGs went unanswered: a connection that died silently (a half-open TCP
    connection, a network black hole) is noticed within seconds, not after nats-py's default of minutes.
    """
    url = target if isinstance(target, str) else target.nats_url

    client: list[NATS] = []

    async def on_disconnect() -> None:
        if client and not client[0].is_closed:  # our own close() is not news
            log.warning("disconnected from NATS")

    async def reconnected() -> None:
        log.info("reconnected to NATS")
        if on_reconnect is not None:
            on_reconnect()

    async def on_error(exc: Exception) -> None:
        log.debug("NATS client error: %s", exc)

    options: dict[str, Any] = dict(
        name=name,
        connect_timeout=2,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        disconnected_cb=on_disconnect,
        reconnected_cb=reconnected,
        error_cb=on_error,
    )
    if isinstance(target, Settings):
        options.update(ping_interval=target.nats_ping_interval, max_outstanding_pings=target.nats_max_outstanding_pings)
        if target.nats_creds_file:
            options["user_credentials"] = target.nats_creds_file
        elif target.nats_user:
            options.update(user=target.nats_user, password=target.nats_password)
    backoff = Backoff()
    while True:
        try:
            client.append(await nats.connect(servers=url.split(","), **options))
            return client[0]
        except Exception as exc:  # nats-py raises several unrelated types for an unreachable server
            if not retry_forever:
                raise
            delay = backoff.next()
            log.warning("cannot connect to NATS at %s (%s); retrying in %.1fs", url, exc, delay)
            await asyncio.sleep(delay)


UNPARTITIONED_SUBJECTS = f"{SUBJECT_PREFIX}.*.*"  # <type>.<id>: as published, stored so without partitions


def partition_subjects(partition: int) -> str:
    """The stored subjects of one partition's events: <type>.<id>.<partition>."""
    return f"{UNPARTITIONED_SUBJECTS}.{partition}"


def consumer_name(settings: Settings, partition: int | None = None) -> str:
    """The durable consumer of settings' projector (or of the given partition)."""
    if not settings.partitions:
        return settings.consumer
    return f"{settings.consumer}-p{settings.partition if partition is None else partition}"


def consumer_subjects(settings: Settings) -> str:
    return partition_subjects(settings.partition) if settings.partitions else UNPARTITIONED_SUBJECTS


async def undrained_consumers(nc: NATS, settings: Settings) -> dict[str, int]:
    """The projection's consumers of another partitioning than settings' that still hold events (name →
    events not yet applied): events its projectors must apply before the partitioning changes for good."""
    current = {consumer_name(settings, p) for p in range(settings.partitions)} or {settings.consumer}
    try:
        consumers = await nc.jsm().consumers_info(settings.stream)
    except NotFoundError:  # no stream yet
        return {}
    left = {}
    for info in consumers:
        name = info.name or ""
        ours = name == settings.consumer or name.removeprefix(f"{settings.consumer}-p").isdigit()
        waiting = (info.num_pending or 0) + (info.num_ack_pending or 0)
        if ours and name not in current and waiting:
            left[name] = waiting
    return left


def stream_config(settings: Settings) -> api.StreamConfig:
    """The event stream: file storage, kept for ever (it is the replay source), deduplicated, open to
    atomic batch publishes (nats-server 2.12+; the relay sends a round of ORDERS_RELAY_ATOMIC_MIN rows or
    more as one batch).

    With settings.partitions = N, the stream stores each event under <type>.<id>.<partition>, where
    the server computes the partition from the aggregate (`partition(N, type, id)`, a deterministic
    hash): every event of one aggregate lands in one partition, whose projector alone applies it."""
    transform = None
    if settings.partitions:
        transform = api.SubjectTransform(
            src=UNPARTITIONED_SUBJECTS,
            dest=f"{SUBJECT_PREFIX}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{partition({settings.partitions},1,2)}}}}",
        )
    return api.StreamConfig(
        name=settings.stream,
        subjects=[SUBJECT_WILDCARD],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_age=0,
        num_replicas=settings.stream_replicas,
        duplicate_window=settings.duplicate_window,
        allow_atomic=True,
        subject_transform=transform,
    )


def consumer_config(settings: Settings) -> api.ConsumerConfig:
    """The projector's durable pull consumer: explicit acks, redelivery after ack_wait.

    The server never gives up on an event (max_deliver -1): once settings.max_deliver deliveries are
    reached the projector dead-letters the event itself, which the server could not do. Retry delays
    come from settings.retry_backoff through nak(delay); the consumer's own BackOff is left unset
    because it replaces ack_wait, and a short first step would redeliver batches still being applied.
    """
    return api.ConsumerConfig(
        durable_name=consumer_name(settings),
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait,
        max_deliver=-1,
        max_ack_pending=max(1000, settings.projector_batch * 4),
        filter_subject=consumer_subjects(settings),
    )


async def ensure_stream(nc: NATS, settings: Settings) -> api.StreamInfo:
    """Create the stream, or update it in place when it exists (idempotent)."""
    jsm = nc.jsm()
    config = stream_config(settings)
    try:
        await jsm.stream_info(settings.stream)
    except NotFoundError:
        return await jsm.add_stream(config)
    return await jsm.update_stream(config)


async def ensure_consumer(nc: NATS, settings: Settings) -> api.ConsumerInfo:
    """Create the durable consumer, or update its settings when it exists (idempotent)."""
    return await nc.jsm().add_consumer(settings.stream, consumer_config(settings))


async def publish_atomic_batch(
    nc: NATS, messages: list[tuple[str, bytes, dict[str, str]]], timeout: float
) -> dict[str, Any]:
    """Publish (subject, payload, headers) messages as one JetStream atomic batch (nats-server 2.12+,
    a stream with allow_atomic) and return the PubAck as JSON: every message but the last goes without a
    reply, the last commits the batch and is answered for all of them. The stream stores the batch
    whole, in order and contiguously, or not at all; a PubAck with an "error" says why not, and one
    without "batch" comes from a server that stored each message on its own."""
    if not messages:
        raise ValueError("an atomic batch needs at least one message")
    batch_id = uuid.uuid4().hex
    for number, (subject, payload, headers) in enumerate(messages, 1):
        marked = {**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(number)}
        if number < len(messages):
            await nc.publish(subject, payload, headers=marked)
        else:
            marked["Nats-Batch-Commit"] = "1"
            reply = await nc.request(subject, payload, timeout=timeout, headers=marked)
    ack: dict[str, Any] = json.loads(reply.data)
    if "error" not in ack and (ack.get("batch") != batch_id or ack.get("count") != len(messages)):
        ack["error"] = {"err_code": NOT_A_BATCH, "description": "the PubAck is not the batch's"}
    return ack


ROUND_TRIP_TIMEOUT = 2  # seconds: a health probe's PING must be answered this fast


async def unresponsive(nc: NATS | None) -> str | None:
    """None while the connection answers a PING; otherwise why it does not (for health probes: a
    connection can look connected for a while after it died)."""
    if nc is None or not nc.is_connected:
        return "not connected to NATS"
    try:
        await nc.flush(timeout=ROUND_TRIP_TIMEOUT)
    except Exception as exc:  # timeout, or the connection broke meanwhile
        return f"NATS does not answer ({type(exc).__name__})"
    return None


async def close(nc: NATS) -> None:
    """Flush what was sent (acks, publishes) and close, without drain()'s wait on open pull requests."""
    if nc.is_connected:
        try:
            await nc.flush(timeout=2)
        except Exception as exc:  # a broken connection cannot be flushed; closing is all that is left
            log.debug("flush before close failed: %s", exc)
    await nc.close()
