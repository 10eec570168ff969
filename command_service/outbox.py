"""The outbox relay: publishes committed outbox rows to JetStream, in outbox order, at least once.

Invariants:
- A row is marked published only after JetStream acknowledged it (PubAck), so a crash between
  publish and mark publishes it again; the stream drops the copy because Nats-Msg-Id = event_id
  (within the stream's duplicate window).
- Rows are read as `WHERE published_at IS NULL ORDER BY id`, never with a cursor over id: ids are
  allocated before commit, and a cursor would skip a row whose transaction committed late.
- Only one relay publishes at a time, across processes: it holds a PostgreSQL session advisory lock
  on the connection it reads and marks with. If that connection breaks, the lock goes with it and
  the relay re-acquires (or another process takes over).
- A batch is published with up to `relay_batch` acks in flight. Publishes leave in outbox order; if
  one fails and a later one succeeds, the projector's per-aggregate version check restores order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import psycopg
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from orders import jetstream
from orders.config import Settings
from orders.db import libpq_url

log = logging.getLogger(__name__)

RELAY_LOCK_KEY = 0x6F72646572730001  # pg_advisory_lock key: "orders" + relay id 1


class OutboxRelay:
    """Moves outbox rows to JetStream. Call `wake()` after a commit; `run()` until cancelled."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._wake = asyncio.Event()
        self._conn: psycopg.AsyncConnection | None = None
        self.published_total = 0
        self.is_leader = False

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
        nc = await jetstream.connect(self._settings.nats_url, "orders-command-relay")
        try:
            await self._ensure_stream(nc)
            js = nc.jetstream(timeout=5)
            while True:
                try:
                    published = await self._round(js)
                except (psycopg.Error, OSError) as exc:
                    log.warning("outbox relay: database error (%s); retrying", exc)
                    await self._drop_connection()
                    published = 0
                if published < self._settings.relay_batch:  # backlog drained: wait for a commit or the poll
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._settings.relay_poll_interval)
                    self._wake.clear()
        finally:
            await self._drop_connection()
            await jetstream.close(nc)

    async def _ensure_stream(self, nc: NATS) -> None:
        delay = 0.2
        while True:
            try:
                await jetstream.ensure_stream(nc, self._settings)
                return
            except Exception as exc:  # timeouts or API errors while NATS starts
                log.warning("cannot set up stream %s (%s); retrying", self._settings.stream, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _leader_connection(self) -> psycopg.AsyncConnection | None:
        """The connection holding the relay lock, or None when another relay holds it."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = await psycopg.AsyncConnection.connect(
            libpq_url(self._settings.write_database_url),
            autocommit=True,
            application_name="orders-relay",
            connect_timeout=5,
        )
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (RELAY_LOCK_KEY,))
        row = await cur.fetchone()
        if not (row and row[0]):
            await conn.close()
            if self.is_leader:
                log.info("outbox relay: lock lost")
            self.is_leader = False
            return None
        log.info("outbox relay: this process is now the publishing relay")
        self.is_leader = True
        self._conn = conn
        return conn

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        self._conn = None
        self.is_leader = False

    async def _round(self, js: JetStreamContext) -> int:
        """Publish one batch of unpublished rows; return how many were published and marked."""
        conn = await self._leader_connection()
        if conn is None:
            return 0
        cur = await conn.execute(
            "SELECT id, subject, headers, payload FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT %s",
            (self._settings.relay_batch,),
        )
        rows = await cur.fetchall()
        if not rows:
            return 0
        started = time.monotonic()
        results = await asyncio.gather(
            *(js.publish(subject, bytes(payload), headers=dict(headers)) for _, subject, headers, payload in rows),
            return_exceptions=True,
        )
        acked = [row[0] for row, result in zip(rows, results, strict=True) if not isinstance(result, BaseException)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if acked:
            await conn.execute("UPDATE outbox SET published_at = now() WHERE id = ANY(%s)", (acked,))
            self.published_total += len(acked)
        if failures:
            log.warning(
                "outbox relay: %d of %d publishes failed (%s); they stay in the outbox and are retried",
                len(failures),
                len(rows),
                failures[0].__class__.__name__,
            )
            await asyncio.sleep(min(self._settings.relay_poll_interval, 1.0))
        else:
            log.debug("outbox relay: published %d events in %.1f ms", len(acked), (time.monotonic() - started) * 1000)
        return len(acked) if not failures else 0

    async def backlog(self) -> int:
        """Rows not yet published (for logs and metrics)."""
        async with await psycopg.AsyncConnection.connect(libpq_url(self._settings.write_database_url)) as conn:
            cur = await conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            row = await cur.fetchone()
            return int(row[0]) if row else 0
