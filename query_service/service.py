"""QueryService servicer: read-your-writes waits, paginated and streamed reads, live watches."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import grpc

from orders import consistency
from orders.config import Settings
from orders.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from orders.grpc_server import rpc
from orders.inputs import MAX_ID_LENGTH
from orders.v1 import queries_pb2, queries_pb2_grpc
from query_service import views
from query_service.changes import OVERFLOW, ChangeFeed, Watch
from query_service.views import ReadModel

log = logging.getLogger(__name__)
MAX_WATCHED_ORDERS = 100


def _order_id(value: str, field: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidArgument([FieldViolation(field, "must be an order id (UUID)")]) from None


def _cut_off(reason: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"watch stream cut off: {reason}; reconnect with after_sequence set to the last stream_sequence received"
    )


class QueryService(queries_pb2_grpc.QueryServiceServicer):
    def __init__(self, read_model: ReadModel, feed: ChangeFeed, settings: Settings) -> None:
        self._read_model = read_model
        self._feed = feed
        self._read_wait_max = settings.read_wait_max
        self._watch_queue_size = settings.watch_queue_size
        self._watch_write_timeout = settings.watch_write_timeout
        self._max_watches = settings.max_watches_per_connection
        self._watches_by_peer: Counter[str] = Counter()  # open watches per client connection (peer address)

    async def _catch_up(self, token: str, context: grpc.aio.ServicerContext) -> None:
        """Wait until the read model reflects token (read-your-writes), or fail with UNAVAILABLE."""
        if not token:
            return
        try:
            versions = consistency.decode(token)
        except consistency.InvalidToken as exc:
            raise InvalidArgument([FieldViolation("consistency_token", str(exc))]) from None
        remaining = context.time_remaining()
        budget = self._read_wait_max if remaining is None else min(self._read_wait_max, max(remaining - 0.1, 0))
        if not await self._feed.wait_for(versions, budget):
            waiting, oldest = await self._read_model.unpublished()
            why = (
                f"{waiting} events are not yet published from the command side's outbox (the oldest {oldest:.0f}s "
                "old), so the projection cannot have them"
                if waiting
                else "projection behind"
            )
            raise Unavailable(
                f"the read model has not caught up with the consistency token within {budget:.2f}s ({why}); retry later"
            )

    @rpc
    async def GetOrderSummary(
        self, request: queries_pb2.GetOrderSummaryRequest, context: grpc.aio.ServicerContext
    ) -> queries_pb2.GetOrderSummaryResponse:
        order_id = _order_id(request.order_id, "order_id")
        await self._catch_up(request.consistency_token, context)
        summary = await self._read_model.order(order_id)
        if summary is None:
            raise NotFound(f"order {order_id} not found")
        return queries_pb2.GetOrderSummaryResponse(summary=summary)

    @rpc
    async def ListOrderSummaries(
        self, request: queries_pb2.ListOrderSummariesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[queries_pb2.ListOrderSummariesResponse]:
        await self._catch_up(request.consistency_token, context)
        newest_first = request.sort_order != queries_pb2.SORT_ORDER_OLDEST_FIRST
        sent = 0
        try:
            async for summary in self._read_model.stream_orders(request.filter, newest_first):
                yield queries_pb2.ListOrderSummariesResponse(summary=summary)
                sent += 1
        except (asyncio.CancelledError, GeneratorExit):  # the client went away: stop reading pages at once
            log.debug("ListOrderSummaries cancelled by the client after %d summaries", sent)
            raise

    @rpc
    async def SearchOrders(
        self, request: queries_pb2.SearchOrdersRequest, context: grpc.aio.ServicerContext
    ) -> queries_pb2.SearchOrdersResponse:
        size = views.page_size(request.page_size)
        await self._catch_up(request.consistency_token, context)
        summaries, token = await self._read_model.search(request.query, request.filter, size, request.page_token)
        return queries_pb2.SearchOrdersResponse(summaries=summaries, next_page_token=token)

    @rpc
    async def ListProducts(
        self, request: queries_pb2.ListProductsRequest, context: grpc.aio.ServicerContext
    ) -> queries_pb2.ListProductsResponse:
        size = views.page_size(request.page_size)
        products, token = await self._read_model.products(
            size, request.page_token, request.in_stock_only, request.name_prefix
        )
        return queries_pb2.ListProductsResponse(products=products, next_page_token=token)

    @rpc(streams=True)
    async def WatchOrderSummaries(
        self, request: queries_pb2.WatchOrderSummariesRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Missed changes (after_sequence) and/or a snapshot, then each change of the selected orders.

        The watch subscribes to the feed BEFORE reading the change log or the snapshot, so a change
        committed in between is queued, and the per-order version filter drops whatever was already
        sent: each change goes out once, in version order, with the stream sequence it reflects.

        A stalled client costs the server a bounded amount, for a bounded time. Once the client's HTTP/2
        flow-control window is full, a write blocks; the stream then ends with RESOURCE_EXHAUSTED as soon
        as either (a) its queue overflows (more than ORDERS_WATCH_QUEUE_SIZE changes arrive meanwhile), or
        (b) the blocked write has waited ORDERS_WATCH_WRITE_TIMEOUT seconds, even if no further change
        ever arrives. The client sees the status after the messages already in flight, and resumes with
        after_sequence. A watcher that is idle (nothing to send) is never cut off: it has no pending
        write, and the server's HTTP/2 keepalive pings (ORDERS_KEEPALIVE_TIME) end only the streams of
        clients that no longer answer them.
        """
        order_ids = self._watch_selection(request)
        peer = context.peer()
        if self._watches_by_peer[peer] >= self._max_watches:
            raise ResourceExhausted(
                f"this connection already has {self._max_watches} open watch streams (the limit); close some, "
                "or watch more orders per stream"
            )
        self._watches_by_peer[peer] += 1
        try:
            await self._watch(request, order_ids, context)
        finally:
            self._watches_by_peer[peer] -= 1
            if not self._watches_by_peer[peer]:
                del self._watches_by_peer[peer]

    async def _watch(
        self, request: queries_pb2.WatchOrderSummariesRequest, order_ids: list[str], context: grpc.aio.ServicerContext
    ) -> None:
        await self._catch_up(request.consistency_token, context)
        watch = Watch(frozenset(order_ids), request.customer_id, self._watch_queue_size)
        self._feed.subscribe(watch)
        cut_off = asyncio.ensure_future(watch.cut_off.wait())
        sent: dict[str, int] = {}

        async def send(summary: queries_pb2.OrderSummary, snapshot: bool) -> None:
            if summary.version <= sent.get(summary.order_id, 0):
                return
            sent[summary.order_id] = summary.version
            write = asyncio.ensure_future(
                context.write(queries_pb2.WatchOrderSummariesResponse(summary=summary, snapshot=snapshot))
            )
            await asyncio.wait((write, cut_off), timeout=self._watch_write_timeout, return_when=asyncio.FIRST_COMPLETED)
            if write.done():
                write.result()
                return
            write.add_done_callback(_retrieve)  # it fails once the call is aborted; nobody awaits it then
            if cut_off.done():
                raise self._overflowed()
            raise _cut_off(f"a message waited {self._watch_write_timeout:g}s for a client that did not read")

        try:
            applied, kept_from = await self._read_model.positions()
            floor = request.after_sequence or applied  # re-read from here if notifications were missed
            if request.after_sequence:
                if request.after_sequence + 1 < kept_from:
                    raise FailedPrecondition(
                        f"changes before stream sequence {kept_from} are no longer kept; reconnect with "
                        "include_snapshot instead of after_sequence",
                        "RESUME_POINT_PRUNED",
                        "after_sequence",
                    )
                for change in await self._read_model.changes_since(order_ids, request.customer_id, floor):
                    await send(change, False)
            if request.include_snapshot:
                current = (
                    await self._read_model.orders_by_ids(order_ids)
                    if order_ids
                    else await self._read_model.orders_of_customer(request.customer_id)
                )
                for summary in current:
                    await send(summary, True)
            while True:
                item = await watch.queue.get()
                if item == OVERFLOW:
                    raise self._overflowed()
                if isinstance(item, str):  # RESYNC: notifications may have been missed
                    updates = await self._read_model.changes_since(order_ids, request.customer_id, floor)
                else:
                    updates = [item]
                for change in updates:
                    await send(change, False)
        finally:
            cut_off.cancel()
            self._feed.unsubscribe(watch)

    def _overflowed(self) -> ResourceExhausted:
        return _cut_off(f"more than {self._watch_queue_size} changes waited for a client that did not read")

    @staticmethod
    def _watch_selection(request: queries_pb2.WatchOrderSummariesRequest) -> list[str]:
        if bool(request.order_ids) == bool(request.customer_id):
            raise InvalidArgument([FieldViolation("order_ids", "set exactly one of order_ids or customer_id")])
        if len(request.order_ids) > MAX_WATCHED_ORDERS:
            raise InvalidArgument([FieldViolation("order_ids", f"at most {MAX_WATCHED_ORDERS} orders per watch")])
        views.check_text(request.customer_id, "customer_id", MAX_ID_LENGTH)
        return sorted({_order_id(v, f"order_ids[{i}]") for i, v in enumerate(request.order_ids)})


def _retrieve(task: asyncio.Future[None]) -> None:
    """Consume an abandoned write's outcome, so that asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()
