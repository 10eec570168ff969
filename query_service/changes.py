"""The projector's signals, fanned out to read-your-writes waits and watches.

On the read primary one LISTEN connection hears the projector's NOTIFYs, delivered at commit in commit
order. A hot standby cannot LISTEN: there the feed follows the projector's announcements on core NATS
(orders.read_changes) and acts on each only once the standby has replayed past its WAL position, so a
woken waiter or watch reads at least what the announcement names. Which of the two applies is found
out at every (re)connect (`pg_is_in_recovery()`); a standby promoted meanwhile is re-joined as primary.

Nothing here polls the read model: a read-your-writes wait sleeps until a signal names one of its
aggregates (or its deadline passes); a watch gets each change of the orders it selected, read once
from the change log for all watchers. Signals missed (the connection was lost, announcements were lost
or dropped) are made up by waking everyone: all waiters re-check and all watches re-read from the
table; on a standby, once it has replayed the next announcement, which is past every lost one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from orders import jetstream, read_changes
from orders.backoff import Backoff
from orders.config import Settings
from orders.consistency import Versions
from orders.db import libpq_url
from orders.read_model import CHANGES_CHANNEL, RESYNC_PAYLOAD
from orders.v1 import queries_pb2
from orders.waits import wait_event
from query_service.views import ReadModel

log = logging.getLogger(__name__)

REPLAY_POLL_FIRST, REPLAY_POLL_MAX = 0.001, 0.05  # seconds between looks at the standby's replay position
MAX_WAITING_ANNOUNCEMENTS = 10_000  # more not yet replayed: drop them and re-read everything later
RESYNC = "resync"  # queue marker: notifications may have been missed, re-read the selection
OVERFLOW = "overflow"  # queue marker: the watcher fell too far behind and is cut off


@dataclass(eq=False)
class Watch:
    """One watch stream's selection and its bounded queue of pending changes."""

    order_ids: frozenset[str]
    customer_id: str
    queue_size: int
    queue: asyncio.Queue[queries_pb2.OrderSummary | str] = field(init=False)
    cut_off: asyncio.Event = field(init=False, default_factory=asyncio.Event)  # set when the queue overflowed

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.queue_size)

    def offer(self, item: queries_pb2.OrderSummary | str) -> None:
        """Queue an item without ever blocking the feed; a full queue cuts the watcher off."""
        if self.cut_off.is_set():
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.cut_off.set()
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(OVERFLOW)


@dataclass(eq=False)
class _Waiter:
    keys: frozenset[tuple[str, str]]
    event: asyncio.Event = field(default_factory=asyncio.Event)


class Promoted(Exception):
    """The standby being followed left recovery: it is a primary now."""


@dataclass(frozen=True)
class _Received:
    at: float  # monotonic time of arrival
    announcement: read_changes.Announcement | None  # None: announcements before this one were lost


class ChangeFeed:
    """Hears the projector's signals and wakes the interested waits and watches."""

    def __init__(self, settings: Settings, read_model: ReadModel) -> None:
        self._settings = settings
        self._url = libpq_url(settings.query_database)
        self._read_model = read_model
        self._waiters: set[_Waiter] = set()
        self._by_order: dict[str, set[Watch]] = defaultdict(set)
        self._by_customer: dict[str, set[Watch]] = defaultdict(set)
        self.connected = asyncio.Event()
        self.standby = False  # the read database is a hot standby (announcements, not LISTEN)
        self._nc: NATS | None = None
        self._inbox: asyncio.Queue[_Received] = asyncio.Queue()
        self._replayed = 0  # the standby's last known replay position
        self._announced = 0  # the highest position announced so far
        self.replica_lag_bytes = 0  # announced but not yet replayed (0 on a primary)
        self.replica_lag_seconds = 0.0  # how long the oldest announcement not yet replayed has waited

    async def run(self) -> None:
        """Follow the signals until cancelled, reconnecting with back-off when a connection breaks."""
        backoff = Backoff()
        try:
            while True:
                try:
                    async with await psycopg.AsyncConnection.connect(
                        self._url, autocommit=True, application_name="orders-query-listener", connect_timeout=5
                    ) as conn:
                        cur = await conn.execute("SELECT pg_is_in_recovery()")
                        self.standby = bool((await cur.fetchone() or (False,))[0])
                        if self.standby:
                            await self._follow_announcements(conn, backoff)
                        else:
                            await self._listen(conn, backoff)
                except asyncio.CancelledError:
                    raise
                except Promoted:
                    log.warning("the read database left recovery (promoted); following it as a primary")
                except Exception as exc:
                    log.warning("change feed lost its connection (%s); reconnecting", exc)
                self.connected.clear()
                await backoff.sleep()
        finally:
            if self._nc is not None:
                await jetstream.close(self._nc)

    async def probe(self) -> str | None:
        """Health probe: None while following the projector's signals."""
        if self.standby and (self._nc is None or not self._nc.is_connected):
            return "change feed (on a standby) not connected to NATS, where the projector announces its commits"
        if not self.connected.is_set():
            return "change feed not connected to the read database"
        return None

    def _ready(self, backoff: Backoff) -> None:
        self.connected.set()
        backoff.reset()
        self._wake_everyone()

    async def _listen(self, conn: psycopg.AsyncConnection[Any], backoff: Backoff) -> None:
        """On the primary: the projector's NOTIFYs, delivered at its commits."""
        self.replica_lag_bytes, self.replica_lag_seconds = 0, 0.0
        await conn.execute(f"LISTEN {CHANGES_CHANNEL}")
        self._ready(backoff)
        async for notify in conn.notifies():
            if notify.payload == RESYNC_PAYLOAD:  # the tables were swapped by a rebuild: everyone re-reads
                self._wake_everyone()
                continue
            try:
                entries = json.loads(notify.payload)
            except ValueError:
                log.error("ignoring malformed change notification %.200r", notify.payload)
                continue
            await self._dispatch(entries)

    async def _follow_announcements(self, conn: psycopg.AsyncConnection[Any], backoff: Backoff) -> None:
        """On a standby: the projector's announcements, each once the standby has replayed past it."""
        if self._nc is None:
            self._nc = await jetstream.connect(self._settings, "orders-query", on_reconnect=self._lost)
        self._inbox = asyncio.Queue()
        self._lost()  # whatever was announced before the subscription
        sub = await self._nc.subscribe(read_changes.subject(self._settings.stream), cb=self._receive)
        try:
            self._ready(backoff)
            lost = False
            while True:
                received = await self._inbox.get()
                if received.announcement is None:
                    lost = True
                    continue
                announcement = received.announcement
                await self._until_replayed(conn, announcement.lsn, received.at)
                if lost or announcement.resync:
                    lost = False
                    self._wake_everyone()
                else:
                    await self._dispatch(announcement.changes)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _lost(self) -> None:
        """Announcements may have been lost here (reconnect, overflow): re-read at the next one."""
        self._inbox.put_nowait(_Received(time.monotonic(), None))

    async def _receive(self, msg: Msg) -> None:
        try:
            announcement = read_changes.Announcement.decode(msg.data)
        except ValueError as exc:
            log.error("ignoring a malformed announcement: %s", exc)
            return
        self._announced = max(self._announced, announcement.lsn)
        if self._inbox.qsize() >= MAX_WAITING_ANNOUNCEMENTS:  # the standby is far behind: keep the newest only
            while not self._inbox.empty():
                self._inbox.get_nowait()
            self._lost()
        self._inbox.put_nowait(_Received(time.monotonic(), announcement))

    async def _until_replayed(self, conn: psycopg.AsyncConnection[Any], lsn: int, since: float) -> None:
        """Wait until the standby has replayed past lsn, measuring the replica lag meanwhile."""
        poll = Backoff(REPLAY_POLL_FIRST, REPLAY_POLL_MAX)
        while not read_changes.replayed_enough(self._replayed, lsn):
            cur = await conn.execute("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")
            in_recovery, position = await cur.fetchone() or (False, None)
            if not in_recovery:
                raise Promoted
            self._replayed = read_changes.parse_lsn(position) if position else 0
            self.replica_lag_bytes = max(self._announced - self._replayed, 0)
            self.replica_lag_seconds = time.monotonic() - since
            if read_changes.replayed_enough(self._replayed, lsn):
                break
            await asyncio.sleep(poll.next())
        if self._inbox.empty():
            self.replica_lag_bytes, self.replica_lag_seconds = 0, 0.0

    def _wake_everyone(self) -> None:
        for waiter in self._waiters:
            waiter.event.set()
        for watch in self._all_watches():
            watch.offer(RESYNC)

    def _all_watches(self) -> set[Watch]:
        watches: set[Watch] = set()
        for group in (*self._by_order.values(), *self._by_customer.values()):
            watches |= group
        return watches

    async def _dispatch(self, entries: list[list[Any]]) -> None:
        """Wake the waiters and feed the watches interested in these changes (the read model shows them)."""
        try:
            changes = [(kind, key, seq, customer) for kind, key, _version, seq, customer in entries]
        except (ValueError, TypeError):
            log.error("ignoring malformed change entries %.200r", entries)
            return
        keys = {(kind, key) for kind, key, _, _ in changes}
        for waiter in self._waiters:
            if waiter.keys & keys:
                waiter.event.set()
        interested: dict[int, set[Watch]] = {}  # stream sequence of an order change → its watchers
        for kind, key, seq, customer in changes:
            if kind != "order":
                continue
            watches = self._by_order.get(key, set()) | self._by_customer.get(customer, set())
            if watches:
                interested[seq] = watches
        if not interested:
            return
        for summary in await self._read_model.changes_at(sorted(interested)):
            for watch in interested[summary.stream_sequence]:
                watch.offer(summary)

    async def wait_for(self, versions: Versions, timeout: float) -> bool:
        """Wait until the read model is at or past every version in versions; False on timeout."""
        waiter = _Waiter(frozenset(versions))
        self._waiters.add(waiter)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                waiter.event.clear()
                current = await self._read_model.versions(list(versions))
                if all(current.get(key, 0) >= version for key, version in versions.items()):
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                await wait_event(waiter.event, remaining)
        finally:
            self._waiters.discard(waiter)

    def subscribe(self, watch: Watch) -> None:
        for order_id in watch.order_ids:
            self._by_order[order_id].add(watch)
        if watch.customer_id:
            self._by_customer[watch.customer_id].add(watch)

    def unsubscribe(self, watch: Watch) -> None:
        for index, keys in ((self._by_order, watch.order_ids), (self._by_customer, _nonempty(watch.customer_id))):
            for key in keys:
                group = index.get(key)
                if group is not None:
                    group.discard(watch)
                    if not group:
                        del index[key]

    @property
    def active_watches(self) -> int:
        return len(self._all_watches())


def _nonempty(value: str) -> Iterable[str]:
    return [value] if value else []
