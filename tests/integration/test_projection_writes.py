"""A batch is written whole or not at all, also when another projector instance creates one of its rows first."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from orders.db import libpq_url
from orders.events import parse_event
from projector.projections import Item, Outcome, apply_events, concurrent_write, execute_writes, plan, queue_reads
from tests.support import Stack, product_event


def items(*events: tuple[int, bytes]) -> list[Item]:
    return [Item(seq, parse_event(payload)) for seq, payload in events]


def test_a_row_created_by_another_instance_rolls_the_whole_batch_back_and_it_applies_again(stack: Stack) -> None:
    """Given a batch that read no row for a new product (and so could not lock it), when another instance
    creates that row before the batch writes, then the batch's writes fail as a concurrent write and
    nothing of it is committed (not even its other product); applied again, it finds the other
    instance's row: v1 a duplicate, v2 applied, and the other product applied exactly once."""
    raced, bystander = f"R-{uuid.uuid4().hex[:8]}", f"B-{uuid.uuid4().hex[:8]}"
    base = 10_000_000 + uuid.uuid4().int % 1_000_000  # stream sequences of this test only
    r1, r2, b1 = product_event(raced, 1, 5), product_event(raced, 2, 4), product_event(bystander, 1, 9)
    url = libpq_url(stack.settings.read_database_url)

    def batch() -> list[Item]:
        return items((base, r1.payload), (base + 1, r2.payload), (base + 2, b1.payload))

    async def scenario() -> tuple[list[Outcome | None], list[Outcome | None]]:
        async with (
            await psycopg.AsyncConnection.connect(url) as slow,
            await psycopg.AsyncConnection.connect(url, autocommit=True) as other,
        ):
            first = batch()
            async with slow.pipeline():
                reads = await queue_reads(slow, first)
            folded = await plan(first, reads)
            assert [i.outcome for i in first] == [Outcome.APPLIED] * 3  # planned against no rows at all
            async with other.transaction():  # the other instance: v1 of the raced product, committed
                await apply_events(other, items((base, r1.payload)))
            with pytest.raises(psycopg.Error) as failed:
                async with slow.pipeline():
                    await execute_writes(slow, folded)
                    await slow.commit()
            assert concurrent_write(failed.value), failed.value
            await slow.rollback()
            again = batch()
            async with slow.transaction():
                await apply_events(slow, again)
            return [i.outcome for i in first], [i.outcome for i in again]

    _, outcomes = asyncio.run(scenario())
    assert outcomes == [Outcome.DUPLICATE, Outcome.APPLIED, Outcome.APPLIED]
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT sku, version, stock, stream_seq FROM product_views WHERE sku = ANY(%s)", ([raced, bystander],)
        ).fetchall()
        rows = {sku: (version, stock, seq) for sku, version, stock, seq in found}
    assert rows == {raced: (2, 4, base + 1), bystander: (1, 9, base + 2)}
