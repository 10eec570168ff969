"""The projector's consumer loop: fetch a batch, apply it in one read-database transaction, then ack.

While a backlog drains (the last fetch came back full), the next batch is fetched while the current
one applies (its fetch overlaps the commit's round trips). Otherwise the next fetch waits for the
commit: it then takes everything that arrived meanwhile in one batch, where a fetch started earlier
would return with the first event to arrive and leave the rest for one more transaction. Batches are
applied one after the other, in delivery order, and a projector that stops applies the batch it
fetched meanwhile before it goes (nothing it holds waits for ack_wait).

Invariants:
- Acks are sent only after the batch's transaction committed; a crash before that makes JetStream
  redeliver, and the version check in projections turns the redelivery into a no-op.
- An event that arrived before its predecessor (GAP) is nak'ed with a delay from the retry schedule,
  capped at GAP_MAX_DELAY (a plain nak would redeliver at once and burn deliveries in milliseconds),
  never applied early.
- Errors are classified. Permanent (undecodable, contradicting its envelope, failing on its own):
  dead-lettered at once with its raw bytes and terminated. Transient (database unreachable): the batch
  is held, its ack deadline renewed, and applied as soon as the database answers again (nak'ed with
  the schedule's delay instead when the projector stops meanwhile, or when the database answered at
  once: a lock or statement timeout is not an outage). A GAP that reaches `max_deliver` deliveries is dead-lettered
  only when the stream does not hold its predecessor (if it does, the predecessor is on its way).
  Later events of a dead-lettered aggregate are parked in the dead-letter table instead of retried,
  while other aggregates keep flowing. The consumer itself never gives up on an event (its server-side
  max_deliver is unlimited): giving up is the projector's decision, so it is always recorded.
- Each commit NOTIFYs the changed rows to query services on the read primary (delivered at commit),
  and is then announced on core NATS to those on replicas (projector/announcer.py), before the next
  batch is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import nats.errors
import nats.js.errors
import psycopg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from prometheus_client import Counter, Histogram
from sqlalchemy.ext.asyncio import AsyncEngine

from orders import jetstream, outbox_report, tracing
from orders.backoff import Backoff
from orders.config import Settings
from orders.correlation import child_traceparent
from orders.db import driver_transaction, is_unavailable
from orders.events import HEADER_CORRELATION_ID, HEADER_TRACEPARENT, UndecodableEvent, parse_event, stored_subjects
from orders.outbox_report import OutboxReport
from orders.read_model import CHANGES_CHANNEL, projection_name
from orders.waits import cancel_and_wait, wait_event
from projector import dead_letters
from projector.announcer import Announcer
from projector.projections import (
    Change,
    Item,
    NeverApplicable,
    Outcome,
    check_applicable,
    concurrent_write,
    execute_writes,
    plan,
    queue_reads,
)

log = logging.getLogger(__name__)

NOTIFY_CHUNK_BYTES = 7000  # PostgreSQL caps a NOTIFY payload at 8000 bytes
FETCH_TIMEOUT = 1.0  # a fetch waits this long for the first event of a batch
FETCH_RETRY_DELAY = 0.5  # pause after a fetch that failed (not one that found nothing)
LEFTOVER_FETCH_TIMEOUT = 0.1  # a last fetch on a subscription about to be replaced
OUTAGE_RECHECK_FIRST, OUTAGE_RECHECK_MAX = 0.1, 1.0  # seconds between checks of a read database that is down
# This many empty fetches in a row (each waits FETCH_TIMEOUT) → check the subscription is still alive.
# Counted in fetches, not seconds: a process that was frozen (SIGSTOP, a VM pause) has not been idle.
STALL_CHECK_FETCHES = 15
CONCURRENT_WRITE_RETRIES = 3  # a batch whose rows another instance created first is applied again at once
GAP_RECHECKS = 20  # in-process re-checks of a batch's GAP events, while they make progress
GAP_RECHECK_PAUSE = 0.02
# A GAP resolves as soon as its predecessor is applied, and re-checking it costs one version comparison,
# so its redelivery delay stays short (the growing back-off is for failures); being dead-lettered only
# when the stream lacks its predecessor, a GAP does not give up sooner because of it.
GAP_MAX_DELAY = 2.0
PREDECESSOR_LOOKUPS = 100  # stream lookups for an event between a GAP and its aggregate's applied version

APPLIED = Counter("orders_projector_events_applied", "Events applied to the read model")
DUPLICATES = Counter(
    "orders_projector_events_duplicate", "Redelivered or republished events skipped as already applied"
)
DEAD_LETTERS = Counter("orders_projector_dead_letters", "Events recorded as dead letters, by status", ["status"])
BATCH_SECONDS = Histogram(
    "orders_projector_batch_seconds",
    "Handling one fetched batch: apply in one transaction, then ack",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)


def change_entries(changes: list[Change]) -> list[list[Any]]:
    """What a commit changed, as announced to the query side: [kind, key, version, stream_seq, customer_id]."""
    return [[c.kind, c.key, c.version, c.stream_seq, c.customer_id] for c in changes]


def change_payloads(changes: list[Change]) -> list[str]:
    """Split changes into NOTIFY payloads: JSON lists of change entries."""
    payloads: list[str] = []
    chunk: list[str] = []
    size = 2
    for entry in change_entries(changes):
        item = json.dumps(entry)
        if chunk and size + len(item) + 1 > NOTIFY_CHUNK_BYTES:
            payloads.append("[" + ",".join(chunk) + "]")
            chunk, size = [], 2
        chunk.append(item)
        size += len(item) + 1
    if chunk:
        payloads.append("[" + ",".join(chunk) + "]")
    return payloads


async def signal_changes(conn: psycopg.AsyncConnection[Any], projection: str, changes: list[Change]) -> None:
    """Record progress and NOTIFY the query side, in the caller's transaction (delivered at commit)."""
    if not changes:
        return
    await conn.execute(
        "WITH checkpoint AS (INSERT INTO projection_checkpoints (projection, last_stream_seq, updated_at)"
        " VALUES (%s, %s, now()) ON CONFLICT (projection) DO UPDATE SET last_stream_seq ="
        " GREATEST(projection_checkpoints.last_stream_seq, EXCLUDED.last_stream_seq), updated_at = now())"
        " SELECT pg_notify(%s, payload) FROM unnest(%s::text[]) AS payload",
        (projection, max(c.stream_seq for c in changes), CHANGES_CHANNEL, change_payloads(changes)),
    )


def _set_aside(
    items: list[tuple[Msg, Item]],
    known: dict[tuple[str, str], list[tuple[int, int | None]]],
    rejected: list[dead_letters.DeadLetter],
) -> tuple[list[Item], list[dead_letters.DeadLetter]]:
    """The items to fold, and the dead letters of the batch: those rejected before (undecodable), and
    one for each item set aside because it is a dead letter already (redelivered after a crash) or
    waits behind an open dead letter of its aggregate (`known`, from the database, and the rejected)."""
    letters = list(rejected)
    for letter in rejected:  # undecodable events of this very batch block their aggregate too
        known.setdefault((letter.aggregate_type, letter.aggregate_id), []).append(
            (letter.stream_seq, letter.aggregate_version)
        )
    runnable: list[Item] = []
    for msg, item in items:
        mine = known.get(item.aggregate, [])
        if any(seq == item.seq for seq, _ in mine):
            item.outcome = None  # terminated: it is recorded already
            letters.append(_dead_letter(msg, item.event, dead_letters.DEAD, "already dead-lettered"))
        elif dead_letters.blocked_by(mine, item.seq, item.event.aggregate_version):
            item.outcome = None
            letters.append(_dead_letter(msg, item.event, dead_letters.PARKED, "parked behind a dead letter"))
        else:
            runnable.append(item)
    return runnable, letters


def _dead_letter(msg: Msg, event: Any, status: str, reason: str) -> dead_letters.DeadLetter:
    if event is not None:
        aggregate = (event.aggregate_type, event.aggregate_id)
        version, event_id = event.aggregate_version, event.event_id
    else:
        aggregate, version, event_id = dead_letters.aggregate_of_subject(msg.subject), None, None
    return dead_letters.DeadLetter(
        stream_seq=msg.metadata.sequence.stream,
        subject=msg.subject,
        aggregate_type=aggregate[0],
        aggregate_id=aggregate[1],
        aggregate_version=version,
        event_id=event_id,
        status=status,
        reason=reason,
        deliveries=msg.metadata.num_delivered or 1,
        payload=msg.data,
        headers=dict(msg.headers or {}),
    )


def _log_applied(applied: list[Item], started_ns: int) -> None:
    """One INFO line per applied batch, naming every correlation id in it (so that grepping a command's
    correlation id finds its projection, without a line per event at full speed)."""
    ids = list(dict.fromkeys(item.event.correlation_id for item in applied if item.event.correlation_id))
    sequences = [item.seq for item in applied]
    log.info(
        "applied a batch of %d (stream sequences %d-%d) in %.1f ms; correlation ids: %s",
        len(applied),
        min(sequences),
        max(sequences),
        (time.time_ns() - started_ns) / 1e6,
        " ".join(ids) or "-",
        extra={"correlation_ids": ids},
    )


class Projector:
    """Consumes ORDERS_EVENTS through the durable consumer and keeps the read model current."""

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self._settings = settings
        self._engine = engine
        self.applied_total = 0
        self.consuming = False  # the consumer is set up and subscribed
        self.dead_lettered_total = 0
        self.nc: NATS | None = None
        self.projection = projection_name(settings.partitions, settings.partition)
        self.announcer = Announcer(settings, lambda: self.nc)
        self.outbox: OutboxReport | None = None  # the relay's latest report of its unpublished backlog
        self._stopping = asyncio.Event()  # run()'s stop event, once it runs

    @staticmethod
    def _record_applied(msg: Msg, item: Item, started_ns: int) -> None:
        """A span (when tracing) and a DEBUG line for an applied event, in the trace of the command behind it."""
        name = f"apply {item.aggregate[0]}/{item.aggregate[1]} v{item.event.aggregate_version}"
        parent = (msg.headers or {}).get(HEADER_TRACEPARENT)
        with tracing.span(name, parent, consumer=True, started_ns=started_ns) as traceparent:
            log.debug(
                "applied %s/%s v%d (stream sequence %d)",
                *item.aggregate,
                item.event.aggregate_version,
                item.seq,
                extra={"correlation_id": item.event.correlation_id, "traceparent": traceparent},
            )

    async def probe(self) -> str | None:
        """Health probe: None while NATS answers and the consumer is set up."""
        silent = await jetstream.unresponsive(self.nc)
        if silent:
            return silent
        return (
            None if self.consuming else f"waiting for the stream {self._settings.stream} (the command side creates it)"
        )

    def retry_delay(self, deliveries: int) -> float:
        schedule = self._settings.retry_backoff
        return schedule[min(max(deliveries, 1), len(schedule)) - 1]

    async def run(self, stop: asyncio.Event) -> None:
        self._stopping = stop
        nc = self.nc = await jetstream.connect(self._settings, "orders-projector")
        idle_announcements = asyncio.create_task(self.announcer.run_idle(), name="idle-announcements")
        try:
            await nc.subscribe(outbox_report.SUBJECT, cb=self._on_outbox_report)
            await self._setup(nc)
            js = nc.jetstream(timeout=5)
            sub = await self._subscribe(js)
            self.consuming = True
            empty_fetches = 0
            prefetch: asyncio.Future[list[Msg]] | None = None
            try:
                while not stop.is_set():
                    msgs = await prefetch if prefetch else await self.next_batch(sub, FETCH_TIMEOUT)
                    prefetch = None
                    if not msgs:
                        empty_fetches += 1
                        if empty_fetches >= STALL_CHECK_FETCHES:
                            sub = await self._check_stalled(nc, js, sub)
                            empty_fetches = 0
                        continue
                    empty_fetches = 0
                    if len(msgs) == self._settings.projector_batch:  # a backlog: fetch on while this applies
                        prefetch = asyncio.ensure_future(self.next_batch(sub, FETCH_TIMEOUT))
                    with BATCH_SECONDS.time():
                        await self._handle_renewing(msgs, prefetch)
                if prefetch is not None:  # stopping: what was fetched meanwhile is applied, not left to ack_wait
                    msgs, prefetch = await prefetch, None
                    if msgs:
                        await self._handle_renewing(msgs)
            finally:
                if prefetch is not None:
                    prefetch.cancel()
        finally:
            await cancel_and_wait(idle_announcements)
            await jetstream.close(nc)

    @staticmethod
    def fetched(prefetch: asyncio.Future[list[Msg]] | None) -> list[Msg]:
        """What a finished prefetch holds ([] while it is still fetching)."""
        return prefetch.result() if prefetch and prefetch.done() and not prefetch.cancelled() else []

    async def _on_outbox_report(self, msg: Msg) -> None:
        try:
            self.outbox = OutboxReport.decode(msg.data)
        except ValueError as exc:
            log.warning("ignoring a malformed outbox report: %s", exc)

    async def _handle_renewing(self, msgs: list[Msg], prefetch: asyncio.Future[list[Msg]] | None = None) -> None:
        """handle_batch(msgs), telling JetStream every ack_wait/2 that the batch, and the next batch
        already fetched meanwhile, are still being worked on (a batch that applies slowly, say behind a
        lock or during a read-database outage, is not redelivered meanwhile, nor is the one behind it)."""
        batch = asyncio.ensure_future(self.handle_batch(msgs))
        while not (await asyncio.wait({batch}, timeout=self._settings.ack_wait / 2))[0]:
            for msg in [*msgs, *self.fetched(prefetch)]:
                with contextlib.suppress(Exception):  # acked meanwhile, or the connection broke: harmless
                    await msg.in_progress()
        batch.result()

    async def next_batch(self, sub: JetStreamContext.PullSubscription, timeout: float) -> list[Msg]:
        """Up to projector_batch events, or [] when none arrived within timeout seconds.

        nats-py reports an empty fetch as nats.errors.TimeoutError, or as a bare TimeoutError when its
        deadline runs out between its two pull requests (the no-wait probe and the lingering one): both
        mean "nothing yet", not a failure, and the next fetch follows at once.
        """
        try:
            return await sub.fetch(self._settings.projector_batch, timeout=timeout)
        except TimeoutError:
            return []
        except Exception as exc:  # connection trouble: the client reconnects by itself
            log.warning("fetch failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, FETCH_RETRY_DELAY)
            await asyncio.sleep(FETCH_RETRY_DELAY)
            return []

    async def _setup(self, nc: NATS) -> None:
        backoff = Backoff()
        while True:
            try:  # the stream belongs to the command side (it publishes); the projector only reads it
                await nc.jsm().stream_info(self._settings.stream)
                await jetstream.ensure_consumer(nc, self._settings)
                return
            except Exception as exc:
                log.warning("cannot set up the consumer on stream %s (%s); retrying", self._settings.stream, exc)
                await backoff.sleep()

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        return await js.pull_subscribe_bind(
            durable=jetstream.consumer_name(self._settings), stream=self._settings.stream
        )

    async def _check_stalled(
        self, nc: NATS, js: JetStreamContext, sub: JetStreamContext.PullSubscription
    ) -> JetStreamContext.PullSubscription:
        """Watchdog: a pull subscription can stop receiving after a server restart (nats.py #504).

        When fetches keep coming back empty although the consumer has events to deliver, subscribe
        again, but only while nothing is delivered and unacknowledged: events delivered to this
        subscription and still on their way (say, read from the socket after a pause of this
        process) would be dropped with it, and come back only after ack_wait. Whatever the old
        subscription still holds is applied before it goes.
        """
        try:
            info = await sub.consumer_info()
        except Exception as exc:
            log.warning("watchdog: consumer info unavailable (%s: %s); setting it up again", type(exc).__name__, exc)
            await self._setup(nc)  # the subscription is only our inbox: it serves a re-created consumer too
            return sub
        pending, in_flight = info.num_pending or 0, info.num_ack_pending or 0
        if pending and not in_flight:
            log.warning("watchdog: %d events pending but none fetched; subscribing again", pending)
            return await self._resubscribe(js, sub)
        if pending:
            log.info("watchdog: %d events pending, %d delivered and not yet acknowledged; waiting", pending, in_flight)
        return sub

    async def _resubscribe(
        self, js: JetStreamContext, sub: JetStreamContext.PullSubscription
    ) -> JetStreamContext.PullSubscription:
        """A new pull subscription, after applying what the old one had already received."""
        leftover = await self.next_batch(sub, LEFTOVER_FETCH_TIMEOUT)
        if leftover:
            await self.handle_batch(leftover)
        await sub.unsubscribe()
        return await self._subscribe(js)

    async def handle_batch(self, msgs: list[Msg], attempt: int = 0) -> None:
        """Apply msgs in one transaction, then ack, nak or terminate each one."""
        items: list[tuple[Msg, Item]] = []
        rejected: list[dead_letters.DeadLetter] = []
        for msg in msgs:
            try:
                event = parse_event(msg.data)
                check_applicable(event)
            except (UndecodableEvent, NeverApplicable) as exc:
                rejected.append(_dead_letter(msg, None, dead_letters.DEAD, f"permanent: {exc}"))
                continue
            items.append((msg, Item(msg.metadata.sequence.stream, event)))
        try:
            letters = await self._apply(msgs, items, rejected, give_up=False)
            letters += await self._settle_gaps(msgs, items)
        except Exception as exc:
            if concurrent_write(exc) and attempt < CONCURRENT_WRITE_RETRIES:
                log.info("another projector instance wrote a row of this batch first; applying it again")
                await self.handle_batch(msgs, attempt + 1)
            elif is_unavailable(exc) and await self._outage_over():
                await self.handle_batch(msgs)  # the read database was down and answers again: at once
            elif is_unavailable(exc) or len(msgs) == 1:
                await self._retry_later(msgs, exc)
            else:  # one event may be failing the whole batch: find it by applying them one at a time
                log.warning("batch of %d failed (%s); applying its events one by one", len(msgs), exc)
                for msg in msgs:
                    await self.handle_batch([msg])
            return
        for msg, item in items:
            if item.outcome in (Outcome.APPLIED, Outcome.DUPLICATE):
                await msg.ack()
            elif item.outcome is Outcome.GAP:
                log.debug("%s/%s v%d waits for its predecessor", *item.aggregate, item.event.aggregate_version)
                await msg.nak(delay=min(self.retry_delay(msg.metadata.num_delivered or 1), GAP_MAX_DELAY))
        for msg in letters:
            await msg.term()

    async def _settle_gaps(self, msgs: list[Msg], items: list[tuple[Msg, Item]]) -> list[Msg]:
        """Re-try events that arrived before their predecessor, briefly, before nak'ing them.

        With several projector instances on one consumer, an aggregate's events are spread over their
        batches, and the predecessor of a GAP is usually being committed by another instance right
        now. A few short in-process re-checks apply it as soon as that commit lands, instead of a nak
        round trip with the retry schedule's growing delays. Only then is an event that has reached
        max_deliver deliveries declared dead.
        """
        letters: list[Msg] = []
        for _ in range(GAP_RECHECKS):
            waiting = [(msg, item) for msg, item in items if item.outcome is Outcome.GAP]
            if not waiting:
                return letters
            await asyncio.sleep(GAP_RECHECK_PAUSE)
            letters += await self._apply(msgs, waiting, [], give_up=False)
            if all(item.outcome is Outcome.GAP for _, item in waiting):
                break  # nothing moved: the predecessor is not about to arrive
        exhausted = [
            (msg, item)
            for msg, item in items
            if item.outcome is Outcome.GAP
            and (msg.metadata.num_delivered or 1) >= self._settings.max_deliver
            and not await self._predecessor_in_stream(msg, item)
        ]
        if exhausted:
            letters += await self._apply(msgs, exhausted, [], give_up=True)
        return letters

    async def _predecessor_in_stream(self, msg: Msg, item: Item) -> bool:
        """Whether the stream holds, after the aggregate's latest applied event, an event of the aggregate
        between the applied version and this GAP's: then the versions in between are on their way (after a
        stream leader or consumer failover, events delivered to a session that died come back only after
        ack_wait, and a chain of successors waits behind them), and the GAP keeps waiting however many
        deliveries that takes. Usually the first event looked at answers it.

        Only an event whose missing predecessor the stream does not hold (never published, or removed by
        the stream's limits) becomes a dead letter; the events behind it are then parked. When the stream
        cannot be asked, keep waiting.
        """
        if self.nc is None:
            return True
        # Both forms the aggregate's events are stored under: without partitions and with (the
        # partitioning may have changed since the predecessor was stored).
        for subject in stored_subjects(*item.aggregate):
            if await self._between_in_stream(msg, item, subject):
                return True
        return False

    async def _between_in_stream(self, msg: Msg, item: Item, subject: str) -> bool:
        """`_predecessor_in_stream` among the events stored under subject."""
        assert self.nc is not None
        cursor, version = item.applied_seq + 1, item.event.aggregate_version
        jsm = self.nc.jsm()
        try:
            for _ in range(PREDECESSOR_LOOKUPS):
                found = await jsm.get_msg(self._settings.stream, seq=cursor, subject=subject, next=True)
                if found.seq is None:
                    return False
                with contextlib.suppress(UndecodableEvent):
                    between = parse_event(found.data or b"").aggregate_version
                    if found.seq != item.seq and item.applied_version < between < version:
                        log.info(
                            "%s/%s v%d: v%d is in the stream (sequence %d) after %d deliveries; waiting",
                            *item.aggregate,
                            version,
                            between,
                            found.seq,
                            msg.metadata.num_delivered or 1,
                        )
                        return True
                cursor = found.seq + 1  # this GAP itself, a copy of an applied event, or undecodable
        except nats.js.errors.NotFoundError:  # no further event of this aggregate in the stream
            return False
        except Exception as exc:
            log.warning("cannot look up the predecessor of stream sequence %d (%s); waiting for it", item.seq, exc)
            return True
        return True  # too many events to look through: wait rather than give up on an event that may come

    async def _outage_over(self) -> bool:
        """After a batch failed as unavailable: hold it while the read database does not answer, and say
        True once it answers again, so that the batch is applied at once instead of waiting for a nak's
        delay (its ack deadline is renewed meanwhile by _handle_renewing). False when the database
        answers right away (the failure was not an outage: lock or statement timeouts, deadlocks) or
        the projector is stopping: then the batch is nak'ed with the back-off."""
        recheck, was_down = Backoff(OUTAGE_RECHECK_FIRST, OUTAGE_RECHECK_MAX), False
        while not self._stopping.is_set():
            try:
                async with driver_transaction(self._engine) as conn:
                    await conn.execute("SELECT 1")
                return was_down
            except Exception as exc:
                if not is_unavailable(exc):
                    return False
                if not was_down:
                    log.warning("read database unavailable (%s); holding the batch until it answers", exc)
                was_down = True
            await wait_event(self._stopping, recheck.next())
        return False

    async def _retry_later(self, msgs: list[Msg], exc: Exception) -> None:
        """Transient failure (or a lone event failing for a reason not yet known): nak with back-off.

        A lone event that keeps failing is dead-lettered once it reaches max_deliver deliveries.
        """
        if is_unavailable(exc):
            log.warning("read database unavailable (%s); %d events will be redelivered", exc, len(msgs))
        else:
            log.error("event at stream sequence %d failed: %r", msgs[0].metadata.sequence.stream, exc)
            msg = msgs[0]
            if (msg.metadata.num_delivered or 1) >= self._settings.max_deliver:
                with contextlib.suppress(Exception):
                    async with driver_transaction(self._engine) as conn:
                        event = None
                        with contextlib.suppress(UndecodableEvent):
                            event = parse_event(msg.data)
                        reason = f"failed {self._settings.max_deliver} times: {exc!r}"
                        letter = _dead_letter(msg, event, dead_letters.DEAD, reason)
                        await dead_letters.record(conn, [letter])
                    DEAD_LETTERS.labels(letter.status).inc()
                    await msg.term()
                    return
        for msg in msgs:
            await msg.nak(delay=self.retry_delay(msg.metadata.num_delivered or 1))

    async def _apply(
        self, msgs: list[Msg], items: list[tuple[Msg, Item]], rejected: list[dead_letters.DeadLetter], give_up: bool
    ) -> list[Msg]:
        """One transaction over the batch's items, in two round trips; returns the messages to terminate
        (recorded as dead letters in that same transaction).

        The steps: read the aggregates' open dead letters and lock their rows (round trip 1); set aside
        the items that are dead letters already or wait behind one (`_set_aside`); fold the others into
        the rows (`plan`); with give_up, make dead letters of gaps that have had max_deliver deliveries
        (`_give_up_on_gaps`); write the rows, dead letters, checkpoint and NOTIFY, and COMMIT (round
        trip 2); announce the commit on NATS (round trip 3, for the WAL position, on the announcer's
        own connection); then count and log what happened (`_report`).
        """
        started_ns = time.time_ns()
        async with driver_transaction(self._engine) as conn:
            async with conn.pipeline():  # round trip 1
                letters_read = await dead_letters.queue_open_letters(conn, [item.aggregate for _, item in items])
                rows_read = await queue_reads(conn, [item for _, item in items])
            runnable, letters = _set_aside(items, await dead_letters.open_letters(letters_read), rejected)
            folded = await plan(runnable, rows_read)
            if give_up:
                letters += self._give_up_on_gaps(items)
            async with conn.pipeline():  # round trip 2
                await execute_writes(conn, folded)
                await dead_letters.record(conn, letters)
                await signal_changes(conn, self.projection, folded.changes)
                await conn.commit()
        if folded.changes:
            await self.announcer.announce(change_entries(folded.changes))
        self._report(items, letters, started_ns)
        by_seq = {msg.metadata.sequence.stream: msg for msg in msgs}
        return [by_seq[letter.stream_seq] for letter in letters]

    def _give_up_on_gaps(self, items: list[tuple[Msg, Item]]) -> list[dead_letters.DeadLetter]:
        """Dead letters for the gaps (predecessor not applied) that have had max_deliver deliveries."""
        letters = []
        for msg, item in items:
            deliveries = msg.metadata.num_delivered or 1
            if item.outcome is Outcome.GAP and deliveries >= self._settings.max_deliver:
                item.outcome = None
                reason = (
                    f"predecessor (version {item.event.aggregate_version - 1}) still missing after "
                    f"{deliveries} deliveries"
                )
                letters.append(_dead_letter(msg, item.event, dead_letters.DEAD, reason))
        return letters

    def _report(self, items: list[tuple[Msg, Item]], letters: list[dead_letters.DeadLetter], started_ns: int) -> None:
        """Counters, the applied events' log lines and spans, and an error line per dead letter."""
        applied = [(msg, item) for msg, item in items if item.outcome is Outcome.APPLIED]
        if applied:
            _log_applied([item for _, item in applied], started_ns)
        if tracing.enabled() or log.isEnabledFor(logging.DEBUG):
            for msg, item in applied:
                self._record_applied(msg, item, started_ns)
        self.applied_total += len(applied)
        APPLIED.inc(len(applied))
        DUPLICATES.inc(sum(1 for _, item in items if item.outcome is Outcome.DUPLICATE))
        self.dead_lettered_total += len(letters)
        for letter in letters:
            DEAD_LETTERS.labels(letter.status).inc()
            log.error(
                "dead letter (%s) at stream sequence %d, %s/%s v%s: %s",
                letter.status,
                letter.stream_seq,
                letter.aggregate_type,
                letter.aggregate_id,
                letter.aggregate_version,
                letter.reason,
                extra={
                    "correlation_id": letter.headers.get(HEADER_CORRELATION_ID, ""),
                    "traceparent": child_traceparent(letter.headers.get(HEADER_TRACEPARENT)),
                },
            )
