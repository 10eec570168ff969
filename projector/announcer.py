"""Announces the projector's commits on core NATS (orders.read_changes), for query services on replicas.

Invariants:
- One announcement per commit that changed rows, sent after COMMIT returned and before the next
  batch is applied, so one projector's announcements go out in commit order with growing positions.
- The position is `pg_current_wal_insert_lsn()` read after the commit, on a connection of its own in
  autocommit (no transaction, one round trip): it is at or past the commit record's end.
- Announcements are sent one at a time, so their positions grow in the order they are sent.
- An announcement that could not be sent (NATS or the database unreachable, or no position within
  POSITION_TIMEOUT) is not retried: the next one, a batch's or the idle one at most IDLE_INTERVAL
  later, carries `resync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from nats.aio.client import Client as NATS
from prometheus_client import Counter

from orders.config import Settings
from orders.db import libpq_url
from orders.read_changes import IDLE_INTERVAL, Announcement, parse_lsn, subject

log = logging.getLogger(__name__)

POSITION_TIMEOUT = 2.0  # seconds: an unanswered position query must not hold the projector's next batch back
FAILED = Counter("orders_projector_announcements_failed", "Commit announcements that could not be sent")


class Announcer:
    def __init__(self, settings: Settings, client: Callable[[], NATS | None]) -> None:
        self._url = libpq_url(settings.read_database_url)
        self._subject = subject(settings.stream)
        self._client = client
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._missed = False
        self._last_attempt = 0.0  # monotonic time of the last announcement sent or tried
        self._one_at_a_time = asyncio.Lock()  # a position read before a failure is never sent after it

    def resync(self) -> None:
        """Make the next announcement tell every query service to re-read (the tables were replaced)."""
        self._missed = True

    async def announce(self, changes: list[list[Any]]) -> None:
        """Announce a commit (changes: its entries) just made; never raises."""
        async with self._one_at_a_time:
            await self._announce(changes)

    async def _announce(self, changes: list[list[Any]]) -> None:
        try:
            nc = self._client()
            if nc is None or nc.is_closed:
                raise ConnectionError("no NATS connection")
            async with asyncio.timeout(POSITION_TIMEOUT):  # not wait_for: see orders.waits
                position = await self._position()
            await nc.publish(self._subject, Announcement(position, changes, self._missed).encode())
            self._missed = False
        except Exception as exc:
            if not self._missed:
                log.warning("cannot announce a commit to the query services (%s); the next announcement resyncs", exc)
            FAILED.inc()
            self._missed = True
        finally:
            self._last_attempt = time.monotonic()

    async def run_idle(self) -> None:
        """Announce the position every IDLE_INTERVAL while nothing else was announced (or tried: a database
        or NATS that is down is not asked more often than that), until cancelled."""
        try:
            while True:
                await asyncio.sleep(max(IDLE_INTERVAL - (time.monotonic() - self._last_attempt), 0.05))
                if time.monotonic() - self._last_attempt >= IDLE_INTERVAL:
                    await self.announce([])
        finally:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.close()

    async def _position(self) -> int:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, application_name="orders-projector-announcer", connect_timeout=5
            )
        try:
            cur = await self._conn.execute("SELECT pg_current_wal_insert_lsn()::text")
            row = await cur.fetchone()
        except BaseException:  # a failure or the timeout: the next announcement connects anew
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
            raise
        assert row is not None
        return parse_lsn(row[0])
