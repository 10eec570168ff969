"""Poison events, retries and parking: the dead-letter table and the operator actions on it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest

from orders import jetstream, local_stack
from orders.config import Settings
from orders.db import libpq_url
from orders.events import OutgoingEvent
from orders.v1 import admin_pb2, admin_pb2_grpc
from tests.support import (
    Infra,
    eventually,
    isolated_settings,
    migrate,
    product_event,
    publish_events,
    start_serving,
    stays,
)


@dataclass
class ProjectorUnderTest:
    settings: Settings
    proc: local_stack.ManagedProcess
    admin: admin_pb2_grpc.AdminServiceStub

    def view(self, sku: str) -> tuple[int, int] | None:
        with psycopg.connect(libpq_url(self.settings.read_database_url)) as conn:
            row = conn.execute("SELECT version, stock FROM product_views WHERE sku = %s", (sku,)).fetchone()
        return None if row is None else (row[0], row[1])

    def letters(self) -> list[admin_pb2.DeadLetter]:
        return list(self.admin.ListDeadLetters(admin_pb2.ListDeadLettersRequest(), timeout=5).dead_letters)

    def publish(self, *items: OutgoingEvent | tuple[str, bytes]) -> None:
        async def send() -> None:
            nc = await jetstream.connect(self.settings.nats_url, "test", retry_forever=False)
            try:
                js = nc.jetstream()
                for item in items:
                    subject, payload = (item.subject, item.payload) if isinstance(item, OutgoingEvent) else item
                    await js.publish(subject, payload, headers={"Nats-Msg-Id": str(uuid.uuid4())})
            finally:
                await jetstream.close(nc)

        asyncio.run(send())


@pytest.fixture
def projector(infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path) -> Iterator[ProjectorUnderTest]:
    yield from projector_under_test(infra, own_nats, tmp_path)


@pytest.fixture
def projector_short_ack_wait(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> Iterator[ProjectorUnderTest]:
    yield from projector_under_test(infra, own_nats, tmp_path, ack_wait=4.0)


def projector_under_test(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path, **overrides: object
) -> Iterator[ProjectorUnderTest]:
    settings = isolated_settings(infra, nats_url=own_nats.url, max_deliver=3, retry_backoff=(0.2,), **overrides)
    asyncio.run(migrate(settings))
    asyncio.run(publish_events(settings, []))  # creates the stream
    channel = grpc.insecure_channel(settings.admin_addr)
    under_test = ProjectorUnderTest(
        settings, start_serving("projector", settings, tmp_path), admin_pb2_grpc.AdminServiceStub(channel)
    )
    try:
        yield under_test
    finally:
        channel.close()
        under_test.proc.stop()  # the test may have restarted it


def test_an_undecodable_event_parks_the_events_behind_it_in_the_same_batch(projector: ProjectorUnderTest) -> None:
    """Published while the projector is down, all arrive in one fetch: the later event must still park."""
    projector.proc.stop()
    poisoned, healthy = f"P-{uuid.uuid4().hex[:8]}", f"Q-{uuid.uuid4().hex[:8]}"
    projector.publish(
        (f"orders.v1.events.product.{poisoned}", b"\xff\x00 not protobuf"),
        product_event(poisoned, 1, 5),
        product_event(healthy, 1, 7),
    )
    projector.proc = start_serving("projector", projector.settings, projector.proc.log_path.parent / "again")
    assert eventually(lambda: projector.view(healthy), 10, "other aggregate flows") == (1, 7)
    letters = eventually(lambda: len(found := projector.letters()) == 2 and found, 5, "two dead letters")
    assert [letter.status for letter in letters] == [
        admin_pb2.DEAD_LETTER_STATUS_DEAD,
        admin_pb2.DEAD_LETTER_STATUS_PARKED,
    ]
    assert projector.view(poisoned) is None


def test_undecodable_event_is_dead_lettered_and_parks_its_aggregate(projector: ProjectorUnderTest) -> None:
    poisoned, healthy = f"P-{uuid.uuid4().hex[:8]}", f"Q-{uuid.uuid4().hex[:8]}"
    garbage = b"\xff\x00 not protobuf"
    projector.publish(
        (f"orders.v1.events.product.{poisoned}", garbage), product_event(poisoned, 1, 5), product_event(healthy, 1, 7)
    )
    assert eventually(lambda: projector.view(healthy), 5, "other aggregate flows") == (1, 7)
    letters = eventually(lambda: len(found := projector.letters()) == 2 and found, 5, "two dead letters")
    dead, parked = letters
    assert (dead.status, dead.aggregate_id, dead.aggregate_version) == (admin_pb2.DEAD_LETTER_STATUS_DEAD, poisoned, 0)
    assert "permanent" in dead.reason and dead.deliveries == 1 and dead.stream_sequence > 0
    assert (parked.status, parked.aggregate_version) == (admin_pb2.DEAD_LETTER_STATUS_PARKED, 1)
    assert projector.view(poisoned) is None  # parked, not applied

    shown = projector.admin.GetDeadLetter(admin_pb2.GetDeadLetterRequest(id=dead.id), timeout=5).dead_letter
    assert shown.payload == garbage and not shown.HasField("event")
    shown = projector.admin.GetDeadLetter(admin_pb2.GetDeadLetterRequest(id=parked.id), timeout=5).dead_letter
    assert shown.event.product_upserted.stock == 5

    unknown = max(dead.id, parked.id) + 1000
    for call, request in (
        (projector.admin.GetDeadLetter, admin_pb2.GetDeadLetterRequest(id=unknown)),
        (projector.admin.ReplayDeadLetters, admin_pb2.ReplayDeadLettersRequest(ids=[parked.id, unknown])),
        (projector.admin.DiscardDeadLetters, admin_pb2.DiscardDeadLettersRequest(ids=[dead.id, unknown])),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND and str(unknown) in (refused.value.details() or "")
    assert projector.letters() == letters and projector.view(poisoned) is None  # nothing changed

    # The poison was junk: discard it, then replay what was parked behind it.
    assert (
        projector.admin.DiscardDeadLetters(admin_pb2.DiscardDeadLettersRequest(ids=[dead.id]), timeout=5).discarded == 1
    )
    replayed = projector.admin.ReplayDeadLetters(admin_pb2.ReplayDeadLettersRequest(ids=[parked.id]), timeout=5)
    assert (replayed.applied, replayed.still_open) == (1, 0)
    assert projector.view(poisoned) == (1, 5)
    assert projector.letters() == []
    lag = eventually(
        lambda: (
            (g := projector.admin.GetProjectionLag(admin_pb2.GetProjectionLagRequest(), timeout=5))
            and g.lag_events == 0
            and g
        ),
        5,
        "terminated events acknowledged",
    )
    assert lag.dead_letters == 0 and lag.stream_last_sequence == 3


def test_missing_predecessor_is_dead_lettered_after_max_deliver_then_replayed(projector: ProjectorUnderTest) -> None:
    sku, other = f"G-{uuid.uuid4().hex[:8]}", f"O-{uuid.uuid4().hex[:8]}"
    v2 = product_event(sku, 2, 20)
    projector.publish(product_event(sku, 1, 10), product_event(sku, 3, 30))
    letters = eventually(lambda: projector.letters(), 10, "gap dead-lettered after 3 deliveries")
    assert [(dl.aggregate_version, dl.status, dl.deliveries) for dl in letters] == [
        (3, admin_pb2.DEAD_LETTER_STATUS_DEAD, 3)
    ]
    assert "predecessor" in letters[0].reason

    projector.publish(product_event(sku, 4, 40), product_event(other, 1, 1))
    eventually(lambda: len(projector.letters()) == 2, 5, "v4 parked behind v3")
    assert projector.letters()[1].status == admin_pb2.DEAD_LETTER_STATUS_PARKED
    assert projector.view(other) == (1, 1)

    projector.publish(v2)  # the lost predecessor finally arrives: it is older than the dead letter, so it applies
    assert eventually(lambda: projector.view(sku) == (2, 20), 5, "v2 applied")
    result = projector.admin.ReplayDeadLetters(admin_pb2.ReplayDeadLettersRequest(ids=[letters[0].id]), timeout=5)
    assert (result.applied, result.still_open) == (2, 0)
    assert projector.view(sku) == (4, 40)
    assert projector.letters() == []


def withhold_next_delivery(settings: Settings) -> int:
    """Fetch the consumer's next event on a session of its own and never ack it, as a projector that
    died right after the fetch would (JetStream redelivers it after ack_wait); returns its stream sequence."""

    async def take() -> int:
        nc = await jetstream.connect(settings.nats_url, "dying-projector", retry_forever=False)
        try:
            sub = await nc.jetstream().pull_subscribe_bind(durable=settings.consumer, stream=settings.stream)
            (msg,) = await sub.fetch(1, timeout=5)
            return int(msg.metadata.sequence.stream)
        finally:
            await jetstream.close(nc)

    return asyncio.run(take())


def test_a_gap_whose_predecessor_is_in_the_stream_waits_past_max_deliver(
    projector_short_ack_wait: ProjectorUnderTest, tmp_path: Path
) -> None:
    """After a failover, an event delivered to a session that died comes back only after ack_wait; its
    successor meanwhile runs out of deliveries as a GAP. It must wait, not become a dead letter."""
    projector = projector_short_ack_wait
    sku = f"W-{uuid.uuid4().hex[:8]}"
    projector.publish(product_event(sku, 1, 10))
    eventually(lambda: projector.view(sku) == (1, 10), 10, "v1 applied")
    projector.proc.stop()
    projector.publish(product_event(sku, 2, 20))
    withheld = withhold_next_delivery(projector.settings)
    projector.publish(product_event(sku, 3, 30))
    projector.proc = start_serving("projector", projector.settings, tmp_path / "restarted")

    assert eventually(lambda: projector.view(sku) == (3, 30), 30, "v2 redelivered after ack_wait, then v3")
    assert projector.letters() == []
    log = projector.proc.log_path.read_text()
    assert f"v3: v2 is in the stream (sequence {withheld})" in log, "v3 never ran out of deliveries"


def test_a_database_outage_holds_the_batch_and_applies_it_as_soon_as_the_database_answers(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    """The batch that met the outage is neither redelivered (its ack deadline is renewed, although the
    outage outlasts ack_wait) nor retried in a tight loop, and is applied within a second or two of
    the database's return, not after a nak's back-off delay (10 s here)."""
    pg = local_stack.start_postgres(tmp_path / "readdb", durable=False)
    settings = isolated_settings(
        infra,
        nats_url=own_nats.url,
        read_database_url=pg.url("orders_read"),
        retry_backoff=(10.0,),
        ack_wait=2.0,
        max_deliver=50,
    )
    asyncio.run(migrate(settings))
    asyncio.run(publish_events(settings, []))
    proc = start_serving("projector", settings, tmp_path / "logs")
    try:
        sku = f"T-{uuid.uuid4().hex[:8]}"
        asyncio.run(publish_events(settings, [product_event(sku, 1, 1)]))

        def deliveries() -> int:
            async def ask() -> int:
                nc = await jetstream.connect(settings.nats_url, "test", retry_forever=False)
                try:
                    info = await nc.jsm().consumer_info(settings.stream, settings.consumer)
                    return int(info.delivered.consumer_seq or 0)
                finally:
                    await jetstream.close(nc)

            return asyncio.run(ask())

        with psycopg.connect(libpq_url(settings.read_database_url)) as conn:
            eventually(
                lambda: conn.execute("SELECT version FROM product_views WHERE sku = %s", (sku,)).fetchone() == (1,),
                10,
                "first event applied",
            )
        eventually(lambda: deliveries() == 1, 10, "first event delivered once")
        pg.stop()
        asyncio.run(publish_events(settings, [product_event(sku, 2, 2)]))
        eventually(lambda: deliveries() == 2, 10, "the second event delivered")
        eventually(lambda: not local_stack.grpc_serving(settings.admin_addr), 10, "health NOT_SERVING")
        stays(lambda: deliveries() == 2, 3 * settings.ack_wait, "the held event not redelivered")

        pg = local_stack.start_postgres(tmp_path / "readdb", port=pg.port, durable=False)
        back = time.monotonic()
        with psycopg.connect(libpq_url(settings.read_database_url)) as conn:
            eventually(
                lambda: conn.execute("SELECT version FROM product_views WHERE sku = %s", (sku,)).fetchone() == (2,),
                15,
                "event applied after the outage",
            )
        assert time.monotonic() - back < 5.0  # not after the 10 s of a nak's back-off
        eventually(lambda: local_stack.grpc_serving(settings.admin_addr), 15, "health SERVING again")
        assert deliveries() == 2 and proc.alive()
    finally:
        proc.stop()
        pg.stop()
