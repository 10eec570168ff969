"""The write side's pipeline in one process, without gRPC or service processes: the command handlers,
the outbox relay and the projector, built as their services build them, against real PostgreSQL and
NATS. What a command decides reaches the read model, once, in version order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from command_service.handlers import CommandContext, CommandHandlers
from command_service.outbox import OutboxRelay
from orders import db, local_stack
from orders.conversions import money
from orders.db import libpq_url
from orders.errors import FailedPrecondition
from orders.v1 import commands_pb2
from orders.waits import cancel_and_wait
from projector.consumer import Projector
from tests.support import Infra, assert_stream_matches_write_database, isolated_settings, migrate


def context() -> CommandContext:
    return CommandContext(request_id=str(uuid.uuid4()), correlation_id="in-process")


def order(ctx: CommandContext, customer: str, *lines: tuple[str, int]) -> commands_pb2.PlaceOrderRequest:
    return commands_pb2.PlaceOrderRequest(
        request_id=ctx.request_id,
        customer_id=customer,
        lines=[commands_pb2.PlaceOrderLine(sku=sku, quantity=n) for sku, n in lines],
    )


async def until(probe: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await probe():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


async def read_rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(libpq_url(url)) as conn:
        return await (await conn.execute(sql, params)).fetchall()


def test_commands_reach_the_read_model_through_the_relay_and_the_projector_in_one_process(
    infra: Infra, own_nats: local_stack.LocalNats
) -> None:
    settings = isolated_settings(infra, nats_url=own_nats.url)
    asyncio.run(migrate(settings))

    async def scenario() -> None:
        write = db.create_engine(settings.write_database_url, 8, "test-handlers")
        read = db.create_engine(settings.read_database_url, 4, "test-projector")
        relay = OutboxRelay(settings)
        handlers = CommandHandlers(write, on_commit=relay.wake)
        projector = Projector(settings, read)
        stop = asyncio.Event()
        relay_task, projector_task = asyncio.create_task(relay.run()), asyncio.create_task(projector.run(stop))
        try:
            ctx = context()
            upsert = commands_pb2.UpsertProductRequest(
                request_id=ctx.request_id, sku="LAMP-1", name="Lamp", unit_price=money(1500, "EUR")
            )
            await handlers.upsert_product(upsert, ctx)
            ctx = context()
            stock = commands_pb2.UpdateInventoryRequest(request_id=ctx.request_id, sku="LAMP-1", set_level=10)
            await handlers.update_inventory(stock, ctx)
            # Twelve orders of one unit at once (they share transactions): ten placed, two refused.
            outcomes = await asyncio.gather(
                *(
                    handlers.place_order(order(c, f"c{i}", ("LAMP-1", 1)), c)
                    for i, c in enumerate(context() for _ in range(12))
                ),
                return_exceptions=True,
            )
            placed = [o for o in outcomes if isinstance(o, commands_pb2.PlaceOrderResponse)]
            refused = [o for o in outcomes if isinstance(o, FailedPrecondition)]
            assert (len(placed), len(refused)) == (10, 2), outcomes
            ctx = context()
            cancel = commands_pb2.CancelOrderRequest(request_id=ctx.request_id, order_id=placed[0].order_id)
            await handlers.cancel_order(cancel, ctx)

            async def projected() -> bool:
                views = await read_rows(settings.read_database_url, "SELECT stock, version FROM product_views")
                statuses = await read_rows(
                    settings.read_database_url, "SELECT status, count(*) FROM order_summaries GROUP BY status"
                )
                return views == [(1, 13)] and dict(statuses) == {"PLACED": 9, "CANCELLED": 1}

            # v1 upsert, v2 stock 10, v3..v12 ten reservations, v13 the cancellation's release: stock 1
            await until(projected, 30, "the read model to show every command")
        finally:
            stop.set()
            async with asyncio.timeout(30):  # both stop when asked, as in the services
                await cancel_and_wait(relay_task)
                await projector_task
            await write.dispose()
            await read.dispose()

    asyncio.run(scenario())
    assert_stream_matches_write_database(settings)  # each aggregate's versions 1..n, once, in order
