"""The outbox relay: publishes committed outbox rows to JetStream, at least once, in order per aggregate.

Invariants:
- The outbox holds exactly the events not yet acknowledged by JetStream. A row is deleted only after
  its PubAck, in the same round, so a crash between publish and delete publishes it again; the
  stream drops the copy because Nats-Msg-Id = event_id (within the stream's duplicate window; the
  PubAck then says `duplicate`). Deleting instead of marking costs one write per row, not an UPDATE
  (a new row version and index entries) followed by a later DELETE; the published events' record is
  the stream itself, the write database keeps the state they describe.
- Rows are read as `ORDER BY id` from the start of the table, never with a cursor over id: ids are
  allocated before commit, and a cursor would skip a row whose transaction committed late.
- Per aggregate, outbox id order is version order: every handler takes the aggregate's row lock
  (FOR UPDATE, or the insert of a new aggregate) before it inserts the aggregate's outbox rows, and
  holds it until commit, so the next version's row can only be inserted, with a larger id, after
  this one committed.
- A round of at least `relay_atomic_min` rows goes out in id order as one atomic batch (JetStream
  2.12+, the stream allows it): JetStream stores a batch whole, in order and contiguously, or not at
  all, and the next round starts only after the batch's PubAck. So every aggregate's events are
  stored in version order, whatever fails in between (a batch cut off by a disconnect is abandoned by
  the server; a batch whose PubAck was lost is sent again, see next). One PubAck and one fsync per
  batch cost a fraction of the CPU of one per event, but a batch's commit takes a few milliseconds
  whatever its size, so a smaller round, as under light load, goes event by event.
- Event by event: per aggregate (= per subject) an event only after the previous event of that
  aggregate was acknowledged, a failure stopping that aggregate's chain for the round, different
  aggregates concurrently. So goes a small round, a batch that JetStream refused whole because it holds
  an event the stream already has (a PubAck lost, a crash before the delete: error 10201, duplicate
  message id; JetStream then drops the copies one by one), and every round on a stream or server
  without atomic publishes.
- Only one relay publishes at a time, across processes: it holds a PostgreSQL session advisory lock
  on the connection it reads and deletes with. If that connection breaks, the lock goes with it and
  the relay re-acquires it (or another process, polling, takes over).
- A commit in any process reaches the leader at once: a relay that does not lead passes its process's
  commits on as a core NATS message (WAKE_SUBJECT, coalesced: one per wait), and looks for the lock
  only every relay_poll_interval. The poll still finds whatever a lost wake-up left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import nats.js.errors
import psycopg
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext
from prometheus_client import Counter, Gauge, Histogram

from orders import jetstream, outbox_report
from orders.backoff import Backoff
from orders.config import Settings
from orders.db import libpq_url
from orders.runtime import Throttle
from orders.waits import wait_event

log = logging.getLogger(__name__)

RELAY_LOCK_KEY = 0x6F72646572730001  # pg_advisory_lock key: "orders" + relay id 1
BACKLOG_LOG_INTERVAL = 10.0  # seconds between log lines about a backlog
WAKE_SUBJECT = "orders.v1.relay.wake"  # core NATS: "there are new outbox rows", to whichever relay leads

PUBLISHED = Counter("orders_outbox_published_events", "Outbox events acknowledged by JetStream")
PUBLISH_FAILURES = Counter("orders_outbox_publish_failures", "Publishes that failed and stay in the outbox")
PUBLISH_SECONDS = Histogram(
    "orders_outbox_publish_seconds",
    "One event's publish until its PubAck (for an event sent in an atomic batch: the batch's)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
ROUND_EVENTS = Histogram(
    "orders_outbox_round_events",
    "Events acknowledged per relay round (its _count is the number of rounds that published)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BACKLOG = Gauge("orders_outbox_backlog_events", "Unpublished outbox rows, measured every few seconds by the leader")
OLDEST = Gauge("orders_outbox_oldest_unpublished_seconds", "Age of the oldest unpublished outbox row (0 when none)")


class RoundOutcome(enum.Enum):
    MORE = "more"  # a full batch went out: go again at once
    DRAINED = "drained"  # nothing left (or not the leader): wait for a commit or the poll
    FAILED = "failed"  # publishing or the database failed: retry after a back-off


@dataclass
class Published:
    """What one round's publishes came to."""

    acked: list[int] = field(default_factory=list)  # outbox ids JetStream acknowledged (stored or duplicate)
    duplicates: int = 0  # of those, events the stream already had
    failures: list[BaseException] = field(default_factory=list)


class NotAtomic(Exception):
    """JetStream did not take the batch as one (it holds a duplicate, or atomic publishes are off)."""


class OutboxRelay:
    """Moves outbox rows to JetStream. Call `wake()` after a commit; `run()` until cancelled."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._wake = asyncio.Event()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._next_backlog_check = 0.0
        self.published_total = 0
        self.duplicates_total = 0
        self.is_leader = False
        self._nc: NATS | None = None
        self._failing: str | None = None  # why the last round failed; None once a round succeeds
        self.backlog: tuple[int, float] = (0, 0.0)  # unpublished rows and the oldest one's age, last measured
        self._backlog_logged = Throttle(BACKLOG_LOG_INTERVAL)
        self._atomic = True  # until the server shows it cannot take atomic batches (then per connection)

    async def probe(self) -> str | None:
        """Health probe: None while NATS answers, the last round did not fail, and the backlog stays
        within the lag alert thresholds (ORDERS_LAG_ALERT_EVENTS, ORDERS_LAG_ALERT_SECONDS)."""
        silent = await jetstream.unresponsive(self._nc)
        if silent:
            return f"outbox relay: {silent}"
        waiting, oldest = self.backlog
        if waiting > self._settings.lag_alert_events or oldest > self._settings.lag_alert_seconds:
            return f"outbox relay: {waiting} events unpublished, the oldest {oldest:.0f}s old" + (
                f" ({self._failing})" if self._failing else ""
            )
        return self._failing

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Relay until cancelled; an unexpected failure is logged and the relay starts over."""
        while True:
            try:
                await self._run_connected()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay failed; restarting in 1 s")
                await asyncio.sleep(1.0)

    async def _run_connected(self) -> None:
        nc = self._nc = await jetstream.connect(self._settings, "orders-command-relay")
        self._atomic = True
        try:
            await self._ensure_stream(nc)
            await nc.subscribe(WAKE_SUBJECT, cb=self._on_remote_commit)
            js = nc.jetstream(timeout=self._settings.publish_timeout)
            failures = Backoff()
            while True:
                try:
                    outcome = await self._round(js)
                    await self._housekeeping()
                except (psycopg.Error, OSError) as exc:
                    log.warning("outbox relay: database error (%s: %s); retrying", type(exc).__name__, exc)
                    await self._drop_connection()
                    self._failing = f"outbox relay: database error ({type(exc).__name__}: {exc})"[:200]
                    outcome = RoundOutcome.FAILED
                else:
                    self._failing = "outbox relay: publishes failing" if outcome is RoundOutcome.FAILED else None
                if outcome is RoundOutcome.FAILED:  # retry soon, backing off, whether or not commits arrive
                    await failures.sleep()
                    continue
                failures.reset()
                if outcome is RoundOutcome.DRAINED:
                    await self._idle(nc)
        finally:
            await self._drop_connection()
            await jetstream.close(nc)

    async def _on_remote_commit(self, msg: Any) -> None:
        if self.is_leader:
            self._wake.set()

    async def _idle(self, nc: NATS) -> None:
        """Drained: wait for a commit (the leader: in any process) or the poll interval, whichever first.
        Meanwhile a relay that does not lead passes its own process's commits on to the leader."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.relay_poll_interval
        while (remaining := deadline - loop.time()) > 0:
            if not await wait_event(self._wake, remaining):
                return
            self._wake.clear()
            if self.is_leader:
                return
            with contextlib.suppress(Exception):  # a lost wake-up costs one poll interval at most
                await nc.publish(WAKE_SUBJECT, b"")

    async def _ensure_stream(self, nc: NATS) -> None:
        backoff = Backoff()
        while True:
            try:
                await jetstream.ensure_stream(nc, self._settings)
                self._failing = None
                return
            except Exception as exc:  # timeouts or API errors while NATS starts
                log.warning("cannot set up stream %s (%s); retrying", self._settings.stream, exc)
                self._failing = f"outbox relay: cannot set up stream {self._settings.stream} ({exc})"[:200]
                await backoff.sleep()

    async def _leader_connection(self) -> psycopg.AsyncConnection[Any] | None:
        """The connection holding the relay lock, or None when another relay holds it."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = await psycopg.AsyncConnection.connect(
            libpq_url(self._settings.write_database_url),
            autocommit=True,
            application_name=f"orders-relay-{os.getpid()}",
            connect_timeout=5,
        )
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (RELAY_LOCK_KEY,))
        row = await cur.fetchone()
        if not (row and row[0]):
            await conn.close()
            self.is_leader = False
            self.backlog = (0, 0.0)  # the leader measures and reports it
            return None
        log.info("outbox relay: this process (pid %d) is now the publishing relay", os.getpid())
        self.is_leader = True
        self._conn = conn
        return conn

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        self._conn = None
        self.is_leader = False

    async def _round(self, js: JetStreamContext) -> RoundOutcome:
        """Publish one batch of outbox rows and delete the acknowledged ones."""
        conn = await self._leader_connection()
        if conn is None:
            return RoundOutcome.DRAINED  # another process publishes; poll for its lock
        cur = await conn.execute(
            "SELECT id, subject, headers, payload FROM outbox ORDER BY id LIMIT %s",
            (self._settings.relay_batch,),
        )
        rows = await cur.fetchall()
        if not rows:
            return RoundOutcome.DRAINED
        started = time.monotonic()
        published = Published()
        for start in range(0, len(rows), jetstream.ATOMIC_BATCH_MAX):
            batch = rows[start : start + jetstream.ATOMIC_BATCH_MAX]
            try:
                if self._atomic and len(batch) >= self._settings.relay_atomic_min:
                    await self._publish_atomically(batch)
                    published.acked += [row[0] for row in batch]
                else:
                    await self._publish_one_by_one(js, batch, published)
            except NotAtomic as exc:
                log.debug("outbox relay: publishing %d events one by one (%s)", len(batch), exc)
                await self._publish_one_by_one(js, batch, published)
            except Exception as exc:  # timeout, disconnect, API error: retried next round
                published.failures.append(exc)
                PUBLISH_FAILURES.inc(len(batch))
            if published.failures:
                break
        if published.acked:
            await conn.execute("DELETE FROM outbox WHERE id = ANY(%s)", (published.acked,))
            self.published_total += len(published.acked)
            PUBLISHED.inc(len(published.acked))
            ROUND_EVENTS.observe(len(published.acked))
        if published.duplicates:
            self.duplicates_total += published.duplicates
            log.info(
                "outbox relay: %d events were already in the stream; JetStream dropped the copies",
                published.duplicates,
            )
        if published.failures:
            failure = published.failures[0]
            log.warning(
                "outbox relay: %d of %d publishes failed (%s: %s); they stay in the outbox and are retried",
                len(rows) - len(published.acked),
                len(rows),
                type(failure).__name__,
                failure,
            )
            return RoundOutcome.FAILED
        log.debug(
            "outbox relay: published %d events in %.1f ms", len(published.acked), (time.monotonic() - started) * 1000
        )
        return RoundOutcome.MORE if len(rows) == self._settings.relay_batch else RoundOutcome.DRAINED

    async def _publish_atomically(self, batch: list[tuple[Any, ...]]) -> None:
        """Publish batch as one atomic batch. Raises NotAtomic when JetStream refuses it as a whole for
        holding a duplicate, or does not take atomic batches; any other failure as it is."""
        assert self._nc is not None
        sent = time.perf_counter()
        messages = [(subject, bytes(payload), headers) for _, subject, headers, payload in batch]
        ack = await jetstream.publish_atomic_batch(self._nc, messages, self._settings.publish_timeout)
        error = ack.get("error")
        if error:
            code, why = error.get("err_code"), error.get("description", "")
            if code == jetstream.ATOMIC_BATCH_HAS_DUPLICATE:
                raise NotAtomic(why)
            if code in (jetstream.ATOMIC_PUBLISH_DISABLED, jetstream.NOT_A_BATCH):
                # Without atomic batches a server stores each message on its own and answers the last
                # only: the others may or may not be stored, so they go again one by one (deduplicated).
                self._atomic_off(f"JetStream takes no atomic batches here ({why}; nats-server 2.12+ does)")
                raise NotAtomic(why)
            raise nats.js.errors.APIError.from_error(error)
        elapsed = time.perf_counter() - sent
        for _ in batch:
            PUBLISH_SECONDS.observe(elapsed)

    def _atomic_off(self, why: str) -> None:
        if self._atomic:
            log.warning("outbox relay: %s; publishing event by event, one PubAck each", why)
        self._atomic = False

    async def _publish_one_by_one(self, js: JetStreamContext, batch: list[tuple[Any, ...]], into: Published) -> None:
        """Publish each event on its own: per aggregate one after the other, aggregates concurrently."""
        chains: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        for row in batch:
            chains[row[1]].append(row)

        async def publish_chain(chain: list[tuple[Any, ...]]) -> None:
            for row_id, subject, headers, payload in chain:
                sent = time.perf_counter()
                try:
                    ack = await js.publish(subject, bytes(payload), headers=dict(headers))
                except Exception as exc:  # timeout, disconnect, API error: retried next round
                    into.failures.append(exc)
                    PUBLISH_FAILURES.inc()
                    return
                PUBLISH_SECONDS.observe(time.perf_counter() - sent)
                into.acked.append(row_id)
                if ack.duplicate:
                    into.duplicates += 1

        await asyncio.gather(*(publish_chain(chain) for chain in chains.values()))

    async def _housekeeping(self) -> None:
        """Every few seconds, as leader: measure, report and log the backlog."""
        if self._conn is None:
            return
        now = time.monotonic()
        if now >= self._next_backlog_check:
            self._next_backlog_check = now + outbox_report.INTERVAL
            waiting, oldest = await backlog_state(self._conn)
            BACKLOG.set(waiting)
            OLDEST.set(oldest)
            self.backlog = (waiting, oldest)
            if waiting and self._backlog_logged.allow() is not None:
                log.info("outbox relay: backlog of %d unpublished events, the oldest %.1fs old", waiting, oldest)
            await self._report(outbox_report.OutboxReport(waiting, oldest, self._failing, time.time()))

    async def _report(self, report: outbox_report.OutboxReport) -> None:
        """Tell the projector (core NATS, not the stream) what waits here: it counts it in the lag."""
        if self._nc is not None and self._nc.is_connected:
            with contextlib.suppress(Exception):  # a lost report costs freshness only
                await self._nc.publish(outbox_report.SUBJECT, report.encode())


async def backlog_state(conn: psycopg.AsyncConnection[Any]) -> tuple[int, float]:
    """Outbox rows (all unpublished), and the age in seconds of the oldest of them (0 when none)."""
    cur = await conn.execute(
        "SELECT count(*), coalesce(extract(epoch FROM now() - (SELECT created_at FROM outbox"
        " ORDER BY id LIMIT 1)), 0)::float8 FROM outbox"
    )
    row = await cur.fetchone()
    return (int(row[0]), max(0.0, float(row[1]))) if row else (0, 0.0)


async def backlog_of(settings: Settings) -> int:
    """The backlog, on a connection of its own (for callers outside the relay)."""
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.write_database_url)) as conn:
        return (await backlog_state(conn))[0]
