"""Rebuild: replay the whole stream into fresh tables, then swap them in, with no query downtime.

1. Fresh tables `<table>_rebuild` are created like the live ones (columns, indexes, constraints).
2. An ephemeral consumer reads the stream from its first event; every event is applied to the fresh
   tables with the same code as the live projector, up to the stream's last sequence at the start.
   Meanwhile the live projector keeps the live tables current and queries read those.
3. The swap transaction locks the live tables (ACCESS EXCLUSIVE, in the projector's own lock order:
   orders, then products), applies the events published since step 2 ended, renames the fresh tables
   into place and drops the old ones, and NOTIFYs a resync. Queries and the live projector wait on the
   lock only for the duration of this catch-up; afterwards their statements resolve to the new tables.
   The live projector's batches that were waiting apply on top and are classified by version as usual.
Events in the dead-letter table stay there: the rebuilt rows skip them exactly as the live rows did.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats.errors
import psycopg
from nats.aio.client import Client as NATS
from nats.js import api
from psycopg import sql
from sqlalchemy.ext.asyncio import AsyncEngine

from orders.config import Settings
from orders.db import driver_transaction, libpq_url
from orders.errors import FailedPrecondition
from orders.events import SUBJECT_WILDCARD, UndecodableEvent, parse_event
from orders.read_model import CHANGES_CHANNEL, PROJECTED_TABLES, RESYNC_PAYLOAD
from projector.projections import Item, NeverApplicable, Tables, apply_events, check_applicable

log = logging.getLogger(__name__)

FRESH = Tables(orders="order_summaries_rebuild", products="product_views_rebuild", changes=None)
FETCH_BATCH = 1000


@dataclass(frozen=True)
class Progress:
    replayed: int
    target_seq: int
    swapped: bool = False


async def _replay(conn: psycopg.AsyncConnection[Any], msgs: list[Any]) -> int:
    items = []
    for msg in msgs:
        try:
            event = parse_event(msg.data)
            check_applicable(event)
        except (UndecodableEvent, NeverApplicable):
            continue  # the live projector dead-lettered it; the rebuilt rows skip it likewise
        items.append(Item(msg.metadata.sequence.stream, event))
    await apply_events(conn, items, FRESH)
    return len(msgs)


REBUILD_LOCK_KEY = 0x6F72646572730002  # pg_advisory_lock key: "orders" + 2 (one rebuild at a time)


class RebuildRunning(FailedPrecondition):
    def __init__(self) -> None:
        super().__init__("a rebuild is already running", "REBUILD_RUNNING", "read model")


async def rebuild(nc: NATS, engine: AsyncEngine, settings: Settings) -> AsyncIterator[Progress]:
    """Run a rebuild, yielding progress; the last Progress has swapped=True. One at a time."""
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.read_database_url), autocommit=True) as guard:
        cur = await guard.execute("SELECT pg_try_advisory_lock(%s)", (REBUILD_LOCK_KEY,))
        if not (await cur.fetchone() or (False,))[0]:
            raise RebuildRunning()
        async for step in _rebuild(nc, engine, settings):
            yield step


async def _rebuild(nc: NATS, engine: AsyncEngine, settings: Settings) -> AsyncIterator[Progress]:
    jsm = nc.jsm()
    js = nc.jetstream(timeout=10)
    target = (await jsm.stream_info(settings.stream)).state.last_seq or 0
    async with driver_transaction(engine) as conn:
        for live, fresh in zip(PROJECTED_TABLES, (FRESH.orders, FRESH.products), strict=True):
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(fresh)))
            await conn.execute(
                sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(sql.Identifier(fresh), sql.Identifier(live))
            )
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.NONE,
        filter_subject=SUBJECT_WILDCARD,
        inactive_threshold=60.0,
    )
    sub = await js.pull_subscribe(SUBJECT_WILDCARD, stream=settings.stream, config=config)
    replayed = 0
    try:
        position = 0
        while position < target:
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=2.0)
            except nats.errors.TimeoutError:
                continue
            async with driver_transaction(engine) as conn:
                replayed += await _replay(conn, msgs)
            position = msgs[-1].metadata.sequence.stream
            yield Progress(replayed, target)
        async with driver_transaction(engine) as conn:
            await conn.execute(
                sql.SQL("LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE").format(*map(sql.Identifier, PROJECTED_TABLES))
            )
            while True:  # the live tables are frozen now: catch up with what was published meanwhile
                pending = (await sub.consumer_info()).num_pending or 0
                if not pending:
                    break
                msgs = await sub.fetch(min(pending, FETCH_BATCH), timeout=5.0)
                replayed += await _replay(conn, msgs)
            for live, fresh in zip(PROJECTED_TABLES, (FRESH.orders, FRESH.products), strict=True):
                retired = sql.Identifier(f"{live}_retired")
                await conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(sql.Identifier(live), retired))
                await conn.execute(
                    sql.SQL("ALTER TABLE {} RENAME TO {}").format(sql.Identifier(fresh), sql.Identifier(live))
                )
                await conn.execute(sql.SQL("DROP TABLE {}").format(retired))
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, RESYNC_PAYLOAD))
        log.info("rebuild: replayed %d events and swapped in the new tables", replayed)
        yield Progress(replayed, target, swapped=True)
    finally:
        await sub.unsubscribe()
