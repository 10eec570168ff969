"""The projector applies each aggregate's events once and in version order, whatever JetStream delivers."""

from __future__ import annotations

import asyncio
import uuid

import psycopg

from orders import jetstream
from orders.db import libpq_url
from orders.events import OutgoingEvent
from tests.support import Stack, eventually, product_event


async def publish(stack: Stack, items: list[tuple[OutgoingEvent | tuple[str, bytes], str]]) -> list[bool]:
    """Publish (event or (subject, raw bytes), msg id) pairs in order; return the PubAck duplicate flags."""
    nc = await jetstream.connect(stack.settings.nats_url, "test-publisher", retry_forever=False)
    try:
        js = nc.jetstream(timeout=5)
        flags = []
        for item, msg_id in items:
            subject, payload = (item.subject, item.payload) if isinstance(item, OutgoingEvent) else item
            ack = await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
            flags.append(bool(ack.duplicate))
        return flags
    finally:
        await jetstream.close(nc)


def view(stack: Stack, sku: str) -> tuple[int, int, int] | None:
    """(version, stock, stream_seq) of the product's read row, straight from the read database."""
    with psycopg.connect(libpq_url(stack.settings.read_database_url)) as conn:
        row = conn.execute("SELECT version, stock, stream_seq FROM product_views WHERE sku = %s", (sku,)).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def test_out_of_order_and_duplicate_events_apply_once_in_version_order(stack: Stack) -> None:
    sku, sentinel = f"P-{uuid.uuid4().hex[:8]}", f"S-{uuid.uuid4().hex[:8]}"
    v1, v2, v3 = product_event(sku, 1, 0), product_event(sku, 2, 5), product_event(sku, 3, 7)

    # v3 arrives before v2; a later event of another aggregate tells when the projector has seen v3.
    asyncio.run(
        publish(stack, [(v1, v1.event_id), (v3, v3.event_id), (product_event(sentinel, 1, 1), str(uuid.uuid4()))])
    )
    eventually(lambda: view(stack, sentinel), timeout=5, what="sentinel projected")
    assert view(stack, sku)[:2] == (1, 0)  # type: ignore[index]  # v3 was held back, not applied over v1

    # v2 arrives, plus copies: the same msg id (dropped by JetStream) and a re-publish under a new id.
    duplicates = asyncio.run(
        publish(stack, [(v2, v2.event_id), (v2, v2.event_id), (v2, str(uuid.uuid4())), (v1, str(uuid.uuid4()))])
    )
    assert duplicates == [False, True, False, False]
    final = eventually(lambda: (v := view(stack, sku)) and v[0] == 3 and v, timeout=10, what="v3 applied")
    assert final[1] == 7

    # The re-published copies reached the projector after v3 and changed nothing.
    marker = product_event(sentinel, 2, 2)
    asyncio.run(publish(stack, [(marker, marker.event_id)]))
    eventually(lambda: (v := view(stack, sentinel)) and v[0] == 2, timeout=5, what="second sentinel")
    assert view(stack, sku) == final
