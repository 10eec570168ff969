"""One LISTEN connection on the read database, fanning the projector's signals out to waiters and watches.

The projector NOTIFYs after each commit with the rows it changed (one entry per order change, with
its stream sequence). Notifications arrive in commit order. Nothing here polls: a read-your-writes
wait sleeps until a notification names one of its aggregates (or its deadline passes); a watch gets
each change of the orders it selected, read once from the change log for all watchers.
Notifications sent while the listener is reconnecting are lost, so after every (re)connect all
waiters re-check and all watches re-sync from the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg

from orders.backoff import Backoff
from orders.consistency import Versions
from orders.db import libpq_url
from orders.read_model import CHANGES_CHANNEL, RESYNC_PAYLOAD
from orders.v1 import queries_pb2
from query_service.views import ReadModel

log = logging.getLogger(__name__)

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


class ChangeFeed:
    """Listens for the projector's signals and wakes the interested waits and watches."""

    def __init__(self, read_database_url: str, read_model: ReadModel) -> None:
        self._url = libpq_url(read_database_url)
        self._read_model = read_model
        self._waiters: set[_Waiter] = set()
        self._by_order: dict[str, set[Watch]] = defaultdict(set)
        self._by_customer: dict[str, set[Watch]] = defaultdict(set)
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with back-off when the connection breaks."""
        backoff = Backoff()
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, application_name="orders-query-listener", connect_timeout=5
                ) as conn:
                    await conn.execute(f"LISTEN {CHANGES_CHANNEL}")
                    self.connected.set()
                    backoff.reset()
                    self._wake_everyone()
                    async for notify in conn.notifies():
                        await self._dispatch(notify.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("change listener lost its connection (%s); reconnecting", exc)
            self.connected.clear()
            await backoff.sleep()

    async def probe(self) -> str | None:
        """Health probe: None while listening for the projector's signals."""
        return None if self.connected.is_set() else "change listener not connected to the read database"

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

    async def _dispatch(self, payload: str) -> None:
        if payload == RESYNC_PAYLOAD:  # the tables were swapped by a rebuild: everyone re-reads
            self._wake_everyone()
            return
        try:
            changes = [(kind, key, seq, customer) for kind, key, _version, seq, customer in json.loads(payload)]
        except (ValueError, TypeError):
            log.error("ignoring malformed change notification %.200r", payload)
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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.event.wait(), remaining)
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
