"""The projector's consumer loop: fetch a batch, apply it in one read-database transaction, then ack.

Invariants:
- Acks are sent only after the batch's transaction committed; a crash before that makes JetStream
  redeliver, and the version check in projections turns the redelivery into a no-op.
- An event that arrived before its predecessor (GAP) is nak'ed with a delay, never applied early.
- An event that can never apply (undecodable, contradicting its envelope) is terminated at once
  instead of burning redeliveries. A database outage naks the whole batch with a delay.
- After each commit one NOTIFY per chunk of changed rows tells the query side what changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime

import nats.errors
import sqlalchemy as sa
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orders import jetstream
from orders.config import Settings
from orders.db import is_unavailable
from orders.events import UndecodableEvent, parse_event
from orders.read_model import CHANGES_CHANNEL, projection_checkpoints
from orders.v1 import events_pb2
from projector.projections import Change, NeverApplicable, Outcome, apply_event, check_applicable

log = logging.getLogger(__name__)

PROJECTION_NAME = "order_summaries"
NOTIFY_CHUNK_BYTES = 7000  # PostgreSQL caps a NOTIFY payload at 8000 bytes
STALL_CHECK_SECONDS = 15.0  # empty fetches for this long → check the subscription is still alive


def change_payloads(changes: list[Change]) -> list[str]:
    """Split changes into NOTIFY payloads: JSON lists of [kind, key, version, stream_seq, customer_id]."""
    payloads: list[str] = []
    chunk: list[str] = []
    size = 2
    for change in changes:
        item = json.dumps([change.kind, change.key, change.version, change.stream_seq, change.customer_id])
        if chunk and size + len(item) + 1 > NOTIFY_CHUNK_BYTES:
            payloads.append("[" + ",".join(chunk) + "]")
            chunk, size = [], 2
        chunk.append(item)
        size += len(item) + 1
    if chunk:
        payloads.append("[" + ",".join(chunk) + "]")
    return payloads


class Projector:
    """Consumes ORDERS_EVENTS through the durable consumer and keeps the read model current."""

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self._settings = settings
        self._engine = engine
        self.applied_total = 0

    async def run(self, stop: asyncio.Event) -> None:
        nc = await jetstream.connect(self._settings.nats_url, "orders-projector")
        try:
            await self._setup(nc)
            js = nc.jetstream(timeout=5)
            sub = await self._subscribe(js)
            idle_since = time.monotonic()
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(self._settings.projector_batch, timeout=1.0)
                except nats.errors.TimeoutError:
                    if time.monotonic() - idle_since > STALL_CHECK_SECONDS:
                        sub = await self._check_stalled(js, sub)
                        idle_since = time.monotonic()
                    continue
                except Exception as exc:  # connection trouble: the client reconnects by itself
                    log.warning("fetch failed (%s); retrying", exc)
                    await asyncio.sleep(0.5)
                    continue
                idle_since = time.monotonic()
                await self.handle_batch(msgs)
        finally:
            await jetstream.close(nc)

    async def _setup(self, nc: NATS) -> None:
        delay = 0.2
        while True:
            try:
                await jetstream.ensure_stream(nc, self._settings)
                await jetstream.ensure_consumer(nc, self._settings)
                return
            except Exception as exc:
                log.warning("cannot set up stream/consumer (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        return await js.pull_subscribe_bind(durable=self._settings.consumer, stream=self._settings.stream)

    async def _check_stalled(
        self, js: JetStreamContext, sub: JetStreamContext.PullSubscription
    ) -> JetStreamContext.PullSubscription:
        """Watchdog: a pull subscription can stop receiving after a server restart (nats.py #504).

        When fetches come back empty although the consumer has pending events, subscribe again.
        """
        try:
            info = await sub.consumer_info()
        except Exception as exc:
            log.warning("watchdog: consumer info unavailable (%s); re-creating consumer", exc)
            await self._setup(js._nc)  # type: ignore[attr-defined]
            await sub.unsubscribe()
            return await self._subscribe(js)
        if (info.num_pending or 0) > 0:
            log.warning("watchdog: %d events pending but none fetched; re-subscribing", info.num_pending)
            await sub.unsubscribe()
            return await self._subscribe(js)
        return sub

    async def handle_batch(self, msgs: list[Msg]) -> None:
        """Apply msgs in one transaction, then ack, nak or terminate each one."""
        decoded: list[tuple[Msg, events_pb2.EventEnvelope]] = []
        for msg in msgs:
            try:
                event = parse_event(msg.data)
                check_applicable(event)
            except (UndecodableEvent, NeverApplicable) as exc:
                log.error("terminating event at stream sequence %d: %s", msg.metadata.sequence.stream, exc)
                await msg.term()
                continue
            decoded.append((msg, event))
        if not decoded:
            return
        try:
            outcomes = await self._apply(decoded)
        except Exception as exc:
            if is_unavailable(exc):
                log.warning("read database unavailable (%s); %d events will be redelivered", exc, len(decoded))
            else:
                log.exception("applying a batch of %d events failed; it will be redelivered", len(decoded))
            for msg, _ in decoded:
                await msg.nak(delay=self._settings.gap_retry_delay * 4)
            return
        for (msg, event), outcome in zip(decoded, outcomes, strict=True):
            if outcome is Outcome.GAP:
                log.debug(
                    "%s %s version %d arrived before its predecessor; retrying later",
                    event.aggregate_type,
                    event.aggregate_id,
                    event.aggregate_version,
                )
                await msg.nak(delay=self._settings.gap_retry_delay)
            else:
                await msg.ack()

    async def _apply(self, decoded: list[tuple[Msg, events_pb2.EventEnvelope]]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        changes: list[Change] = []
        async with self._engine.begin() as conn:
            for msg, event in decoded:
                outcome, change = await apply_event(conn, event, msg.metadata.sequence.stream)
                outcomes.append(outcome)
                if outcome is Outcome.APPLIED:
                    changes.append(change)
            if changes:
                await self._record_progress(conn, changes)
        self.applied_total += len(changes)
        return outcomes

    @staticmethod
    async def _record_progress(conn: AsyncConnection, changes: list[Change]) -> None:
        highest = max(change.stream_seq for change in changes)
        stmt = pg_insert(projection_checkpoints).values(
            projection=PROJECTION_NAME, last_stream_seq=highest, updated_at=datetime.now(UTC)
        )
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[projection_checkpoints.c.projection],
                set_=dict(
                    last_stream_seq=sa.func.greatest(projection_checkpoints.c.last_stream_seq, highest),
                    updated_at=stmt.excluded.updated_at,
                ),
            )
        )
        for payload in change_payloads(changes):
            await conn.execute(sa.select(sa.func.pg_notify(CHANGES_CHANNEL, payload)))
